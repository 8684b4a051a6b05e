"""`python -m refusal_sae fit --config configs/default.yaml`"""

from refusal_sae.cli import main

if __name__ == "__main__":
    main()
