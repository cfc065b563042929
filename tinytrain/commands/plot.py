"""`tinytrain plot`: the curves of one or several runs."""

from __future__ import annotations

from pathlib import Path

from tinytrain.errors import TinyTrainError
from tinytrain.train.plot import plot_runs


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain plot", description="Plot the curves of one or several runs.")
    parser.add_argument("runs", nargs="+", help="run folders (e.g. runs/tiny), overlaid in one picture")
    parser.add_argument("--out", default=None, help="the PNG to write (default: RUN/plot.png for one run, plot.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "plot.png" if len(args.runs) == 1 else Path("plot.png"))
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise TinyTrainError("plotting needs matplotlib: pip install 'tinytrain[plot]'")
    print(plot_runs([Path(r) for r in args.runs], out, args.title))
