"""``python -m emcjax.reduce``: see emcjax.frontend.reduce."""

from emcjax.frontend.reduce import main

if __name__ == "__main__":
    main()
