//! Retries, outlier detection, load balancing, limits, faults, rate limits (filled in next).
