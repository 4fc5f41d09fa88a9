//! The policies shipped in the binary, chosen by name in an app's
//! definition.

/// Name and Lua source of every shipped policy.
pub const POLICIES: [(&str, &str); 3] = [
    (
        "adaptive-keepalive",
        include_str!("lua/adaptive_keepalive.lua"),
    ),
    ("subscription", include_str!("lua/subscription.lua")),
    (
        "smart-replication",
        include_str!("lua/smart_replication.lua"),
    ),
];

/// The source of the shipped policy `name`.
pub fn policy_source(name: &str) -> Option<&'static str> {
    POLICIES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
