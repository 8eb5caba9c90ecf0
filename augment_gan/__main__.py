"""`python -m augment_gan` runs the command-line application."""
from augment_gan.cli import main

if __name__ == "__main__":
    main()
