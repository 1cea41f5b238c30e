"""`bcc train`: the same as `python -m bcc.train`, in one process (use accelerate launch for more)."""


def register(subparsers) -> None:
    from bcc.train import add_arguments, run

    parser = subparsers.add_parser("train", help="train a model from a config (one process)", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
