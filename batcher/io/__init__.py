"""Reading inputs and writing results: input formats and the scan before a run, results files,
typed schema columns, private files.
"""
