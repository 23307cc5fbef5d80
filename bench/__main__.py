import argparse
import sys

from maca_infer.bench import ops

parser = argparse.ArgumentParser(prog="python -m maca_infer.bench", description=ops.__doc__.splitlines()[0])
ops.add_arguments(parser)
sys.exit(ops.run(parser.parse_args()))
