"""Write the attention comparison report of a sweep: ``report.md`` and PNG charts beside it.

    python scripts/report.py sweep=multirun/<date>/<time>_compare [bench=bench_out/attention.json]

The command is ``minillm.cli.report`` (also installed as ``minillm-report``); ``--help`` lists
every option.
"""

from minillm.cli.report import main

if __name__ == "__main__":
    main()
