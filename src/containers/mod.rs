//! Containers: podman control for function containers.
