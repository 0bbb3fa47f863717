//! Test-bed access for the end-to-end tests.
