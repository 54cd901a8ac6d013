"""What limits a run: pacing under rate limits, cluster-wide leases, the budget, retries."""
