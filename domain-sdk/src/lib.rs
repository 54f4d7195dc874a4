//! Placeholder; filled by the SDK issue.
