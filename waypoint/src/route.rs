//! Gateway API routing (filled in next).
