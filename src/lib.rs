//! ldap2scim: keeps SCIM 2.0 applications in step with an LDAP or Active Directory directory.
//!
//! The pipeline, in the order data travels: [`config`] → [`source`] (LDAP read) → [`map`]
//! (directory entry → SCIM resource per target) → [`scim::observe`] (what a target holds) →
//! [`plan`] (decide: diff, adoption, orphans, safety guard) → [`apply`] (act, advancing the
//! [`snapshot`]) or [`report`] (dry run); [`reconcile`] wires one pass.
//! Only `source`, `snapshot` and `scim` do I/O.
#![forbid(unsafe_code)]

pub mod apply;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod ha;
pub mod lock;
pub mod map;
pub mod memory;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod outcome;
pub mod plan;
pub mod progress;
pub mod reconcile;
pub mod report;
pub mod scim;
pub mod snapshot;
pub mod source;
