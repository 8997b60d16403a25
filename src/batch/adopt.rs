//! Finding, after a restart or a failed try, the upstream batch Ferry may
//! already have created for one of its batches, so that it is adopted
//! rather than created (and paid for) a second time. Only batches this
//! instance made count: batch numbers repeat across data_dirs that share an
//! upstream key.

use std::time::Duration;

use crate::store::BatchRecord;
use crate::upstream::{BatchObject, UpstreamError};

/// Batches listed per page (the most OpenAI serves).
const PAGE: u32 = 100;

/// How far the upstream's clock may be behind Ferry's: the list is read
/// back to this long before the batch was claimed.
pub const CLOCK_SKEW: Duration = Duration::from_secs(600);

/// Whether `b` is the upstream batch this instance created for Ferry batch
/// `ferry_batch` from `file_id`: it was made from our recorded input file
/// (file ids are unique upstream; this also finds a batch created before
/// instance ids existed), or its metadata names this instance and batch.
pub fn is_ours(b: &BatchObject, instance: &str, ferry_batch: u64, file_id: &str) -> bool {
    if b.input_file_id.as_deref() == Some(file_id) {
        return true;
    }
    b.metadata_str("ferry_instance") == Some(instance)
        && b.metadata_str("ferry_batch_id") == Some(ferry_batch.to_string().as_str())
}

/// Whether the next page of the (newest first) batch list may still hold a
/// batch created for a Ferry batch claimed at `claimed_at` (unix seconds):
/// yes while the upstream has more and the page's last batch is not older
/// than the claim (less [`CLOCK_SKEW`]). A page without creation times
/// cannot be bounded by time: then only the end of the list stops.
pub fn keep_paging(has_more: bool, last_created_at: Option<u64>, claimed_at: u64) -> bool {
    if !has_more {
        return false;
    }
    match last_created_at {
        Some(t) => t >= claimed_at.saturating_sub(CLOCK_SKEW.as_secs()),
        None => true,
    }
}

/// Looks through the upstream's batches, newest first, back to the time
/// `batch` was claimed, for one this instance created from `file_id`.
pub async fn find_created(
    up: &crate::Upstream,
    instance: &str,
    batch: &BatchRecord,
    file_id: &str,
) -> Result<Option<BatchObject>, UpstreamError> {
    let mut after: Option<String> = None;
    let mut pages = 0u32;
    loop {
        let page = up.client.list_batches(after.as_deref(), PAGE).await?;
        pages += 1;
        if let Some(b) = page
            .data
            .iter()
            .find(|b| is_ours(b, instance, batch.id, file_id))
        {
            return Ok(Some(b.clone()));
        }
        let Some(last) = page.data.last() else {
            break;
        };
        // A cursor that does not move would page forever.
        if !keep_paging(page.has_more, last.created_at, batch.created_at)
            || after.as_deref() == Some(last.id.as_str())
        {
            break;
        }
        after = Some(last.id.clone());
    }
    tracing::debug!(
        ferry_batch = batch.id,
        pages,
        "no upstream batch was created for this batch"
    );
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(input: &str, metadata: serde_json::Value) -> BatchObject {
        serde_json::from_value(serde_json::json!({
            "id": "batch_x", "status": "validating",
            "input_file_id": input, "metadata": metadata,
        }))
        .unwrap()
    }

    #[test]
    fn only_this_instances_batch_is_ours() {
        let me = "00112233aabbccdd";
        let mine = serde_json::json!({"ferry_instance": me, "ferry_batch_id": "7"});
        assert!(is_ours(
            &listed("file-other", mine.clone()),
            me,
            7,
            "file-1"
        ));
        assert!(!is_ours(&listed("file-other", mine), me, 8, "file-1"));
        // Another instance's batch 7 (before instance ids, any batch 7 matched).
        let theirs = serde_json::json!({"ferry_instance": "ffff", "ferry_batch_id": "7"});
        assert!(!is_ours(&listed("file-2", theirs), me, 7, "file-1"));
        let old = serde_json::json!({"ferry_batch_id": "7"});
        assert!(!is_ours(&listed("file-2", old.clone()), me, 7, "file-1"));
        // Made from our own recorded upload, whatever its metadata says.
        assert!(is_ours(&listed("file-1", old), me, 7, "file-1"));
    }

    #[test]
    fn paging_goes_back_to_the_claim_less_the_clock_skew() {
        let claimed = 1_700_000_000;
        let skew = CLOCK_SKEW.as_secs();
        // Beyond 10 pages: nothing but time and the end of the list stop it.
        assert!(keep_paging(true, Some(claimed + 86_400), claimed));
        assert!(keep_paging(true, Some(claimed), claimed));
        assert!(keep_paging(true, Some(claimed - skew), claimed));
        assert!(!keep_paging(true, Some(claimed - skew - 1), claimed));
        assert!(!keep_paging(false, Some(claimed + 1), claimed));
        assert!(keep_paging(true, None, claimed));
        assert!(!keep_paging(false, None, claimed));
    }
}

/// Message Batches listed per page (the most Anthropic serves).
const INLINE_PAGE: u32 = 1000;

/// What the scan for an Anthropic batch found.
#[derive(Debug)]
pub enum Inline {
    Found(BatchObject),
    NotCreated,
    /// A batch of the same size is still running and may be this one:
    /// its results (which carry the custom ids) are not readable yet.
    Undecided(String),
}

/// Anthropic batches carry no metadata: a batch is this Ferry batch's when
/// its results' `custom_id`s carry `prefix` (this instance's id and the
/// Ferry batch's number, see [`crate::upstream::anthropic`]). The list is
/// read newest first back to the time `batch` was claimed (less
/// [`CLOCK_SKEW`], as for OpenAI's [`find_created`]), however many batches
/// that takes. Only batches of exactly this batch's size are looked at,
/// by their first result line; an unfinished one of that size cannot be
/// told apart until it ends, so the caller waits rather than risk paying
/// twice.
pub async fn find_created_inline(
    up: &crate::Upstream,
    batch: &BatchRecord,
    prefix: &str,
) -> Result<Inline, UpstreamError> {
    let mut after: Option<String> = None;
    let mut pages = 0u32;
    let mut undecided = None;
    loop {
        let (page, has_more) = up
            .client
            .list_message_batches(after.as_deref(), INLINE_PAGE)
            .await?;
        pages += 1;
        for b in &page {
            if b.request_counts.total() != batch.request_count {
                continue;
            }
            if b.processing_status != "ended" {
                undecided.get_or_insert_with(|| b.id.clone());
                continue;
            }
            let first = up.client.first_result_custom_id(&b.id).await?;
            if first.is_some_and(|id| id.starts_with(prefix)) {
                return Ok(Inline::Found(crate::upstream::anthropic::batch_object(b)));
            }
        }
        let Some(last) = page.last() else {
            break;
        };
        // A cursor that does not move would page forever.
        if !keep_paging(has_more, last.created_secs(), batch.created_at)
            || after.as_deref() == Some(last.id.as_str())
        {
            break;
        }
        after = Some(last.id.clone());
    }
    tracing::debug!(
        ferry_batch = batch.id,
        pages,
        "no message batch was created for this batch"
    );
    Ok(match undecided {
        Some(id) => Inline::Undecided(id),
        None => Inline::NotCreated,
    })
}
