//! HTTP: the node's local server (status page, JSON API, metrics) and the
//! small client the CLI uses, hyper 1 on smol.
