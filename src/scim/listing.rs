//! Reading many resources: every resource of a type page by page ([`ScimClient::list_all`],
//! with the decisions of [`paging`]), and the lookup of resources by one attribute
//! ([`ScimClient::find_eq`]), both from [`wire::ListResponse`]s.
//!
//! It must never return a listing that is incomplete as if it were whole, never take a
//! target's filter for granted (only true matches are kept), and never let one odd resource
//! fail a listing: a resource without a usable id is passed on, for its caller to report.

use std::sync::atomic::Ordering;

use reqwest::Method;
use serde_json::Value;

use super::paging::{self, Pager, Step};
use super::wire::{self, ListResponse};
use super::{ScimClient, TargetError};
use crate::model::ScimId;

impl ScimClient {
    /// Resources whose top-level `attr` equals `value` (`externalId` exactly; `userName` and
    /// `displayName` ignoring case, as RFC 7643 defines them). Asks with `attr eq "value"` (the
    /// one filter every provider supports), or lists everything where filtering is not
    /// supported, and in both cases keeps only true matches: a target that ignores or
    /// misreads the filter never makes someone else's account look like ours.
    pub async fn find_eq(
        &self,
        resource_type: &str,
        attr: &str,
        value: &str,
    ) -> Result<Vec<Value>, TargetError> {
        let candidates = if self.filter_supported.load(Ordering::Relaxed) {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            let filter = format!("{attr} eq \"{escaped}\"");
            let resp = self
                .send(Method::GET, &[resource_type], &[("filter", filter)], None)
                .await?;
            self.list_response(resource_type, resp.body)?
                .into_resources()
        } else {
            self.list_all(resource_type).await?
        };
        let exact = attr == "externalId";
        Ok(candidates
            .into_iter()
            .filter(|r| {
                r.get(attr).and_then(Value::as_str).is_some_and(|v| {
                    if exact {
                        v == value
                    } else {
                        v.to_lowercase() == value.to_lowercase()
                    }
                })
            })
            .collect())
    }

    /// Every resource of a type, page by page. Complete or an error: a target whose paging
    /// does not add up (a repeated page, a `startIndex` that does not advance, more pages than
    /// its first `totalResults` allows) fails the listing (see [`paging`]).
    pub async fn list_all(&self, resource_type: &str) -> Result<Vec<Value>, TargetError> {
        let mut all = Vec::new();
        let page = self.page_size.load(Ordering::Relaxed);
        let mut pager = Pager::new(page);
        loop {
            let query = [
                ("startIndex", pager.start().to_string()),
                ("count", page.to_string()),
            ];
            let resp = self
                .send(Method::GET, &[resource_type], &query, None)
                .await?;
            let bytes = resp.size;
            let list = self.list_response(resource_type, resp.body)?;
            let (start_index, total_results) = (
                list.start_index.get().copied(),
                list.total_results.get().copied(),
            );
            let items = list.into_resources();
            let views: Vec<wire::User> = items.iter().map(wire::User::view).collect();
            let ids: Vec<Option<&str>> = views
                .iter()
                .map(|v| {
                    let id = v.id.get()?;
                    ScimId::parse(id).ok().map(|_| id.as_str())
                })
                .collect();
            let (fresh, step) = pager
                .take(&paging::Page {
                    start_index,
                    total_results,
                    ids: &ids,
                    bytes,
                })
                .map_err(|reason| TargetError::Malformed {
                    target: self.name.clone(),
                    method: "GET".into(),
                    path: format!("/{resource_type}"),
                    reason: format!("paging: {reason}; the listing is incomplete"),
                })?;
            drop(ids);
            drop(views);
            let mut items: Vec<Option<Value>> = items.into_iter().map(Some).collect();
            all.extend(
                fresh
                    .into_iter()
                    .filter_map(|i| items.get_mut(i).and_then(Option::take)),
            );
            if step == Step::Done {
                return Ok(all);
            }
        }
    }

    /// The ListResponse a body is. A resource without a usable id is passed on: it is a
    /// problem for the directory entry it matches (never a reason to create a second
    /// account), not for the whole listing.
    fn list_response(&self, resource_type: &str, body: Value) -> Result<ListResponse, TargetError> {
        ListResponse::parse(body).ok_or_else(|| TargetError::Malformed {
            target: self.name.clone(),
            method: "GET".into(),
            path: format!("/{resource_type}"),
            reason: self.redact("not a SCIM ListResponse (no Resources)"),
        })
    }
}
