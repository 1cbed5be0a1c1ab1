"""Monte Carlo dropout: sampling modes and T-sample prediction for predictive uncertainty."""
