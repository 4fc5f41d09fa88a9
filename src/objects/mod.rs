//! Objects: classes, objects, ordered and exactly-once invocations.
