//! Tests against real podman.
