//! sgp-eval
