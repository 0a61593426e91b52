//! sgp-data
