"""Reading what runs left: the run summary, batcher status, the HTML report, its charts."""
