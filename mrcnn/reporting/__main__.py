"""``python -m mrcnn.reporting <sweep dir> [--keys ...] [--title ...]``: rebuild a sweep's ablation report."""

from mrcnn.reporting.report import main

if __name__ == "__main__":
    main()
