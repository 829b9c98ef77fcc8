//! Every string the controller writes into status conditions, in one place:
//! condition types, their reasons, and the names the controller writes
//! under. The model builder decides the conditions (`model`), the status
//! writers put them where users look (`status`, `gateway_status`); users
//! and tests match on these exact strings, so they change only on purpose.
//!
//! Gateway API spells a condition type and the reason of its happy case
//! alike (`Accepted`/`Accepted`, `Programmed`/`Programmed`,
//! `ResolvedRefs`/`ResolvedRefs`): one constant serves as both.

// ---- condition types ----

/// Policies (`weft.dev`), waypoint Gateways and routes: whether the
/// controller took the object. Also the reason when it did.
pub const ACCEPTED: &str = "Accepted";
/// Waypoint Gateways: whether a waypoint pod serves it. Also the reason
/// when one does.
pub const PROGRAMMED: &str = "Programmed";
/// Routes: whether every backend reference resolved. Also the reason when
/// they all did.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// Routes: some rules were dropped, the rest applied.
pub const PARTIALLY_INVALID: &str = "PartiallyInvalid";

// ---- reasons: weft.dev policies ----

/// An AuthorizationPolicy without targets names HTTP fields, which ztunnel
/// (L4) fails closed on.
pub const L7_FIELDS_FAIL_CLOSED: &str = "L7FieldsFailClosedAtL4";
pub const UNKNOWN_NAMESPACE: &str = "UnknownNamespace";
pub const INVALID_IP_BLOCK: &str = "InvalidIpBlock";
/// A `targetRefs` entry or TrafficPolicy target names nothing.
pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
/// The target exists but does not use a waypoint, so nothing enforces
/// what only a waypoint can.
pub const NO_WAYPOINT: &str = "NoWaypoint";
pub const INVALID_VALUE: &str = "InvalidValue";

// ---- reasons: both ----

/// A policy's target or a route's backend is not a kind weft supports.
pub const INVALID_KIND: &str = "InvalidKind";

// ---- reasons: Gateway API ----

/// A waypoint Gateway's pods exist but none is ready yet.
pub const PENDING: &str = "Pending";
/// A waypoint Gateway has no pod at all.
pub const NO_RESOURCES: &str = "NoResources";
pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
pub const NOT_ALLOWED_BY_LISTENERS: &str = "NotAllowedByListeners";
pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";

// ---- who writes ----

/// `controllerName` of this controller's entries in a route's
/// `status.parents`: Gateway API's name for who wrote them (a domain-prefixed
/// path, as the spec requires).
pub const CONTROLLER_NAME: &str = "weft.dev/waypoint-controller";
/// The field manager of everything the controller applies, the reporting
/// controller of its Events, and `app.kubernetes.io/managed-by` on what it
/// deploys.
pub const FIELD_MANAGER: &str = "weft-controller";
