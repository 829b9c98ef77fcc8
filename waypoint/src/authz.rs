//! L7 authorization (filled in next).
