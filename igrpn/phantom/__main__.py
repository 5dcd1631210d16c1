"""``python -m igrpn.phantom``: generate the phantom data set (options: ``--help``)."""

from igrpn.phantom.dataset import main

if __name__ == "__main__":
    main()
