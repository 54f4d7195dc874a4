//! The demo shop (orders, customers, inventory and the composite shop
//! service), built on the domain-sdk. Filled by the SDK issue; this crate
//! only reserves its place in the workspace.
