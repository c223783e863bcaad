"""``python -m emcjax.simulate_images``: see emcjax.frontend.simulate_images."""

from emcjax.frontend.simulate_images import main

if __name__ == "__main__":
    main()
