//! The single-resource operations of a client: create (without duplicates when an answer is
//! lost), PATCH (from [`PatchOp`]s, with `If-Match` and one retry on a 412), PUT, DELETE
//! (already gone is done) and GET, and the ETag each answer carries.
//!
//! It must never build a request body by hand where a [`wire`] type exists, and never
//! retry on its own beyond what is documented here (retries are [`retry`]'s).

use reqwest::Method;
use serde_json::Value;
use tracing::warn;

use super::wire::{self, PatchOp, PatchRequest};
use super::{resource_id, Response, ScimClient, TargetError};
use crate::model::ScimId;

impl ScimClient {
    /// Creates a resource. A lost answer is not turned into a duplicate: before a retry the
    /// resource is looked up by its `externalId`.
    pub async fn create(
        &self,
        resource_type: &str,
        body: &Value,
    ) -> Result<(ScimId, Option<String>), TargetError> {
        let (id, etag, _) = self.create_returning(resource_type, body).await?;
        Ok((id, etag))
    }

    /// [`create`](Self::create), also returning the resource the target answered with (what
    /// it kept of what we sent).
    pub async fn create_returning(
        &self,
        resource_type: &str,
        body: &Value,
    ) -> Result<(ScimId, Option<String>, Value), TargetError> {
        let external_id = body.get("externalId").and_then(Value::as_str);
        let probe = external_id.map(|e| (resource_type, e));
        let resp = self
            .send_probed(Method::POST, &[resource_type], &[], Some(body), probe, None)
            .await?;
        let id = resource_id(&resp.body).map_err(|reason| TargetError::Malformed {
            target: self.name.clone(),
            method: "POST".into(),
            path: format!("/{resource_type}"),
            reason: self.redact(&format!("the created resource: {reason}")),
        })?;
        let etag = etag_of(&resp);
        Ok((id, etag, resp.body))
    }

    pub async fn patch(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<PatchOp>,
    ) -> Result<Option<String>, TargetError> {
        self.patch_if_match(resource_type, id, ops, None).await
    }

    /// PATCH with `If-Match: etag` when one is known. A 412 (someone changed the resource since
    /// we last saw it) refetches its current ETag and tries once more: our change still wins,
    /// but never blindly over a version we did not see.
    pub async fn patch_if_match(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<PatchOp>,
        etag: Option<&str>,
    ) -> Result<Option<String>, TargetError> {
        let (etag, _) = self.patch_returning(resource_type, id, ops, etag).await?;
        Ok(etag)
    }

    /// [`patch_if_match`](Self::patch_if_match), also returning the answer's body (the
    /// resource, or `Null` for a 204).
    pub async fn patch_returning(
        &self,
        resource_type: &str,
        id: &ScimId,
        ops: Vec<PatchOp>,
        etag: Option<&str>,
    ) -> Result<(Option<String>, Value), TargetError> {
        let body = PatchRequest::new(ops).to_value();
        let segments = [resource_type, id.as_str()];
        match self
            .send_probed(Method::PATCH, &segments, &[], Some(&body), None, etag)
            .await
        {
            Ok(resp) => Ok((etag_of(&resp), resp.body)),
            Err(e) if e.status() == Some(412) && etag.is_some() => {
                let current = self.send(Method::GET, &segments, &[], None).await?;
                let fresh = etag_of(&current);
                warn!(target = %self.name, resource_type, id = %id, "412: the resource changed on the target; refetched its ETag and retrying once");
                let resp = self
                    .send_probed(
                        Method::PATCH,
                        &segments,
                        &[],
                        Some(&body),
                        None,
                        fresh.as_deref(),
                    )
                    .await?;
                Ok((etag_of(&resp), resp.body))
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces a whole resource (for targets without PATCH).
    pub async fn put(
        &self,
        resource_type: &str,
        id: &ScimId,
        body: &Value,
    ) -> Result<Option<String>, TargetError> {
        let resp = self
            .send(Method::PUT, &[resource_type, id.as_str()], &[], Some(body))
            .await?;
        Ok(etag_of(&resp))
    }

    pub async fn delete(&self, resource_type: &str, id: &ScimId) -> Result<(), TargetError> {
        match self
            .send(Method::DELETE, &[resource_type, id.as_str()], &[], None)
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, resource_type: &str, id: &ScimId) -> Result<Value, TargetError> {
        Ok(self
            .send(Method::GET, &[resource_type, id.as_str()], &[], None)
            .await?
            .body)
    }
}

/// The ETag of an answer: its `ETag` header, else the resource's `meta.version`.
pub(crate) fn etag_of(resp: &Response) -> Option<String> {
    resp.etag.clone().or_else(|| {
        wire::User::view(&resp.body)
            .meta
            .into_option()
            .and_then(|m| m.version.into_option())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;
    use serde_json::json;

    fn answer(etag: Option<&str>, body: Value) -> Response {
        Response {
            status: StatusCode::OK,
            etag: etag.map(str::to_string),
            body,
            size: 0,
        }
    }

    #[test]
    fn the_etag_is_the_header_else_meta_version() {
        let body = json!({"id": "a", "meta": {"version": "W/\"2\""}});
        assert_eq!(
            etag_of(&answer(Some("\"1\""), body.clone())).as_deref(),
            Some("\"1\"")
        );
        assert_eq!(etag_of(&answer(None, body)).as_deref(), Some("W/\"2\""));
        for body in [
            json!({"meta": {"version": 2}}),
            json!({"meta": "v1"}),
            json!({"id": "a"}),
            Value::Null,
            json!([{"meta": {"version": "x"}}]),
        ] {
            assert_eq!(etag_of(&answer(None, body.clone())), None, "{body}");
        }
    }
}
