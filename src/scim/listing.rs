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

#[cfg(test)]
mod tests {
    use crate::model::ScimId;
    use crate::scim::client::tests::{quick, serve};

    #[tokio::test]
    async fn odd_fields_do_not_fail_a_listing() {
        // A count of the wrong type, resources without a usable id, and a short page.
        const PAGE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 98\r\nConnection: close\r\n\r\n{\"totalResults\": \"3\", \"startIndex\": \"1\", \"Resources\": [{\"id\": \"a\"}, {\"id\": 7}, {\"userName\": \"x\"}]}";
        let (url, count) = serve(vec![PAGE]).await;
        let mut cfg = crate::plan::tests::target();
        cfg.url = url;
        let listed = quick(&cfg).list_all("Users").await.unwrap();
        assert_eq!(listed.len(), 3, "every resource is passed on: {listed:?}");
        assert_eq!(
            crate::scim::resource_id(&listed[0]).ok(),
            Some(ScimId("a".into()))
        );
        assert!(crate::scim::resource_id(&listed[1]).is_err());
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Not a ListResponse at all: an error naming what it is not.
        const NOT_A_LIST: &str =
            "HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\n[{\"id\": \"a\"}]";
        let (url, _) = serve(vec![NOT_A_LIST]).await;
        let mut cfg = crate::plan::tests::target();
        cfg.url = url;
        let e = quick(&cfg).list_all("Users").await.unwrap_err();
        assert!(e.to_string().contains("not a SCIM ListResponse"), "{e}");
    }
}
