//! Overlay: a sans-IO Pastry core (routing table, leaf set, neighbourhood
//! set, join, route-to-root, probes, repair, leave). It never touches a
//! socket, clock or file; the node runtime and the simulator feed it.
