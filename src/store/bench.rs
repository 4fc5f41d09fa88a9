//! Measurements of the store backend.
