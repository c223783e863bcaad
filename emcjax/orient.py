"""``python -m emcjax.orient``: see emcjax.frontend.orient."""

from emcjax.frontend.orient import main

if __name__ == "__main__":
    main()
