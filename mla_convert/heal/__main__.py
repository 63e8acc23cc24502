"""`python -m mla_convert.heal MLA_FOLDER OUTPUT ...`, for `accelerate launch -m mla_convert.heal ...`: the same as
`mla-convert heal MLA_FOLDER OUTPUT ...`."""

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main  # here, not at the top of the package: cli imports heal lazily

    return cli_main(["heal", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
