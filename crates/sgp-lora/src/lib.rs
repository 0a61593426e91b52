//! sgp-lora
