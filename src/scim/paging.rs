//! The decisions of a paged listing (`list_all`), apart from any I/O: when a listing is
//! complete, and when a target's paging cannot be trusted. A target that lies about
//! `totalResults`, repeats a page or never advances `startIndex` ends its listing with an
//! error, never with a loop and never with a truncated listing taken as complete (adoption
//! lookups rely on a listing being whole).

use std::collections::HashSet;

/// Pages allowed beyond what the first page's `totalResults` implies (resources created
/// while the listing runs).
const SLACK_PAGES: usize = 2;
/// The most pages of any listing, whatever a target says.
pub const MAX_PAGES: usize = 100_000;
/// The most response bytes one listing reads in all (each page is also bounded by
/// `max_response_size`): what a listing may cost in memory, whatever a target says.
pub const MAX_LISTING_BYTES: u64 = 1 << 30;
/// The most resources one listing keeps.
pub const MAX_LISTED: usize = 10_000_000;

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask for the page starting here (1-based).
    Next(usize),
    Done,
}

/// What one page brought, as far as paging is concerned.
pub struct Page<'a> {
    pub start_index: Option<u64>,
    pub total_results: Option<u64>,
    /// The ids of the page's resources, in order; `None` for a resource without a usable id,
    /// which is passed on (its caller reports it for its entry) and always counts as new (the
    /// page limit still bounds a listing of nothing else).
    pub ids: &'a [Option<&'a str>],
    /// The size of the page's response body.
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Pager {
    requested: usize,
    start: usize,
    pages: usize,
    limit: usize,
    last_start_index: Option<u64>,
    seen: HashSet<String>,
    /// Resources taken so far (those without an id included).
    listed: usize,
    /// Response bytes read so far.
    bytes: u64,
    max_bytes: u64,
    max_listed: usize,
}

impl Pager {
    /// A listing asking for `page_size` resources per page.
    pub fn new(page_size: usize) -> Pager {
        Pager::with_limits(page_size, MAX_LISTING_BYTES, MAX_LISTED)
    }

    /// [`new`](Self::new) with other bounds on the bytes read and resources kept.
    pub fn with_limits(page_size: usize, max_bytes: u64, max_listed: usize) -> Pager {
        Pager {
            requested: page_size.max(1),
            start: 1,
            pages: 0,
            limit: MAX_PAGES,
            last_start_index: None,
            seen: HashSet::new(),
            listed: 0,
            bytes: 0,
            max_bytes,
            max_listed,
        }
    }

    /// The `startIndex` of the next request.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Takes one page: which of its resources are new (by index into `page.ids`), and what
    /// comes next; an error says why the listing cannot be trusted.
    pub fn take(&mut self, page: &Page<'_>) -> Result<(Vec<usize>, Step), String> {
        self.pages += 1;
        self.bytes = self.bytes.saturating_add(page.bytes);
        if self.bytes > self.max_bytes {
            return Err(format!(
                "the listing is larger than {} bytes in all after {} pages ({} resources)",
                self.max_bytes, self.pages, self.listed
            ));
        }
        let got = page.ids.len();
        if self.pages == 1 {
            if let Some(total) = page.total_results {
                // Pages are as large as the first one (a target may cap the size we asked).
                let per_page = got.max(1) as u64;
                let pages = total.div_ceil(per_page).saturating_add(SLACK_PAGES as u64);
                self.limit = usize::try_from(pages).unwrap_or(usize::MAX).min(MAX_PAGES);
            }
        }
        if got == 0 {
            // An empty page ends the listing, unless the same page still counts more than
            // came (resources removed meanwhile lower the count; a target that stops early
            // does not).
            return match page.total_results {
                Some(total) if (self.listed as u64) < total => Err(format!(
                    "an empty page at startIndex {} after {} of the {total} resources it counts",
                    self.start, self.listed
                )),
                _ => Ok((Vec::new(), Step::Done)),
            };
        }
        if let (Some(now), Some(before)) = (page.start_index, self.last_start_index) {
            if now <= before {
                return Err(format!(
                    "the listing does not advance: startIndex {now} after {before}"
                ));
            }
        }
        self.last_start_index = page.start_index.or(self.last_start_index);
        let fresh: Vec<usize> = page
            .ids
            .iter()
            .enumerate()
            .filter(|(_, id)| id.is_none_or(|id| self.seen.insert(id.to_string())))
            .map(|(i, _)| i)
            .collect();
        self.listed = self.listed.saturating_add(fresh.len());
        if fresh.is_empty() {
            return Err(format!(
                "page {} (startIndex {}) brings no resource not listed before",
                self.pages, self.start
            ));
        }
        if self.listed > self.max_listed {
            return Err(format!(
                "the listing has more than {} resources after {} pages",
                self.max_listed, self.pages
            ));
        }
        let done = match page.total_results {
            Some(total) => self.listed as u64 >= total,
            // Without totalResults, a short page is the last one.
            None => got < self.requested,
        };
        if done {
            return Ok((fresh, Step::Done));
        }
        // Without totalResults nothing but new ids bounds the listing: a full page of
        // resources without a usable id would ask for the next one up to the page limit.
        let new_id = fresh
            .iter()
            .any(|&i| page.ids.get(i).is_some_and(Option::is_some));
        if page.total_results.is_none() && !new_id {
            return Err(format!(
                "page {} (startIndex {}) brings no resource with a usable id, and no totalResults says when the listing ends",
                self.pages, self.start
            ));
        }
        if self.pages >= self.limit {
            return Err(format!(
                "the listing did not end after {} pages ({} resources of the {} totalResults announced)",
                self.pages,
                self.listed,
                page.total_results
                    .map_or_else(|| "unknown".to_string(), |t| t.to_string())
            ));
        }
        self.start = self.start.saturating_add(got);
        Ok((fresh, Step::Next(self.start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page<'a>(start: Option<u64>, total: Option<u64>, ids: &'a [Option<&'a str>]) -> Page<'a> {
        Page {
            start_index: start,
            total_results: total,
            ids,
            bytes: 100,
        }
    }

    #[test]
    fn a_listing_is_bounded_in_bytes_and_resources() {
        // Honest paging, but more bytes in all than a listing may read.
        let mut p = Pager::with_limits(1, 250, MAX_LISTED);
        let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
        let mut result = Ok((Vec::new(), Step::Done));
        for (i, id) in ids.iter().enumerate() {
            result = p.take(&page(Some(i as u64 + 1), Some(10), &[Some(id.as_str())]));
            if result.is_err() {
                break;
            }
        }
        let e = result.unwrap_err();
        assert!(e.contains("larger than 250 bytes"), "{e}");
        assert!(e.contains("after 3 pages"), "{e}");
        // More resources than a listing may keep.
        let mut p = Pager::with_limits(2, MAX_LISTING_BYTES, 3);
        p.take(&page(Some(1), Some(10), &[Some("a"), Some("b")]))
            .unwrap();
        let e = p
            .take(&page(Some(3), Some(10), &[Some("c"), Some("d")]))
            .unwrap_err();
        assert!(e.contains("more than 3 resources"), "{e}");
        // The defaults are what the contract says.
        let p = Pager::new(1);
        assert_eq!((p.max_bytes, p.max_listed), (1 << 30, 10_000_000));
    }

    #[test]
    fn without_total_a_full_page_of_id_less_resources_ends_it_with_an_error() {
        let mut p = Pager::new(2);
        assert_eq!(
            p.take(&page(None, None, &[Some("a"), None])).unwrap(),
            (vec![0, 1], Step::Next(3))
        );
        let e = p.take(&page(None, None, &[None, None])).unwrap_err();
        assert!(e.contains("no resource with a usable id"), "{e}");
        // A short last page of them is passed on: the listing ends there anyway.
        let mut p = Pager::new(2);
        p.take(&page(None, None, &[Some("a"), Some("b")])).unwrap();
        assert_eq!(
            p.take(&page(None, None, &[None])).unwrap(),
            (vec![0], Step::Done)
        );
        // A page of id-less resources alongside a fresh id goes on.
        let mut p = Pager::new(3);
        assert_eq!(
            p.take(&page(None, None, &[None, Some("a"), None])).unwrap(),
            (vec![0, 1, 2], Step::Next(4))
        );
    }

    #[test]
    fn an_honest_listing_ends_at_total() {
        let mut p = Pager::new(2);
        assert_eq!(
            p.take(&page(Some(1), Some(3), &[Some("a"), Some("b")]))
                .unwrap(),
            (vec![0, 1], Step::Next(3))
        );
        assert_eq!(
            p.take(&page(Some(3), Some(3), &[Some("c")])).unwrap(),
            (vec![0], Step::Done)
        );
    }

    #[test]
    fn a_capped_page_size_is_followed() {
        // Asked for 100, the target sends 2 per page.
        let mut p = Pager::new(100);
        assert_eq!(
            p.take(&page(Some(1), Some(5), &[Some("a"), Some("b")]))
                .unwrap()
                .1,
            Step::Next(3)
        );
        assert_eq!(
            p.take(&page(Some(3), Some(5), &[Some("c"), Some("d")]))
                .unwrap()
                .1,
            Step::Next(5)
        );
        assert_eq!(
            p.take(&page(Some(5), Some(5), &[Some("e")])).unwrap().1,
            Step::Done
        );
    }

    #[test]
    fn without_total_a_short_page_ends_it() {
        let mut p = Pager::new(2);
        assert_eq!(
            p.take(&page(None, None, &[Some("a"), Some("b")]))
                .unwrap()
                .1,
            Step::Next(3)
        );
        assert_eq!(
            p.take(&page(None, None, &[Some("c")])).unwrap().1,
            Step::Done
        );
        let mut p = Pager::new(2);
        assert_eq!(p.take(&page(None, None, &[])).unwrap().1, Step::Done);
    }

    #[test]
    fn an_empty_page_before_the_count_is_an_error() {
        let mut p = Pager::new(2);
        p.take(&page(Some(1), Some(5), &[Some("a"), Some("b")]))
            .unwrap();
        let e = p.take(&page(Some(3), Some(5), &[])).unwrap_err();
        assert!(e.contains("after 2 of the 5"), "{e}");
        // Removed meanwhile: the count went down with it.
        let mut p = Pager::new(2);
        p.take(&page(Some(1), Some(3), &[Some("a"), Some("b")]))
            .unwrap();
        assert_eq!(p.take(&page(Some(3), Some(2), &[])).unwrap().1, Step::Done);
        // An empty target.
        let mut p = Pager::new(2);
        assert_eq!(p.take(&page(Some(1), Some(0), &[])).unwrap().1, Step::Done);
    }

    #[test]
    fn a_repeated_page_is_an_error() {
        let mut p = Pager::new(1);
        p.take(&page(Some(1), Some(1_000_000_000), &[Some("a")]))
            .unwrap();
        let e = p
            .take(&page(Some(2), Some(1_000_000_000), &[Some("a")]))
            .unwrap_err();
        assert!(e.contains("no resource not listed before"), "{e}");
    }

    #[test]
    fn a_start_index_that_does_not_advance_is_an_error() {
        let mut p = Pager::new(1);
        p.take(&page(Some(1), Some(10), &[Some("a")])).unwrap();
        let e = p.take(&page(Some(1), Some(10), &[Some("b")])).unwrap_err();
        assert!(e.contains("does not advance"), "{e}");
    }

    #[test]
    fn resources_without_an_id_are_passed_on_and_counted() {
        let mut p = Pager::new(2);
        assert_eq!(
            p.take(&page(Some(1), Some(3), &[None, None])).unwrap(),
            (vec![0, 1], Step::Next(3))
        );
        assert_eq!(
            p.take(&page(Some(3), Some(3), &[Some("a")])).unwrap(),
            (vec![0], Step::Done)
        );
        // Nothing but id-less resources forever: the page limit ends it.
        let mut p = Pager::new(1);
        let mut result = Ok((Vec::new(), Step::Done));
        for i in 0..10 {
            result = p.take(&page(Some(i + 1), Some(2), &[None]));
            if result.is_err() || result.as_ref().is_ok_and(|r| r.1 == Step::Done) {
                break;
            }
        }
        assert_eq!(result.unwrap().1, Step::Done, "the count was reached");
    }

    #[test]
    fn a_growing_total_is_bounded_by_the_first_one() {
        // The first page says 2 in all; the target then keeps inventing new resources.
        let mut p = Pager::new(1);
        let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
        let mut result = Ok((Vec::new(), Step::Done));
        for (i, id) in ids.iter().enumerate() {
            let total = if i == 0 { 2 } else { 1_000 };
            result = p.take(&page(Some(i as u64 + 1), Some(total), &[Some(id.as_str())]));
            if result.is_err() {
                break;
            }
        }
        let e = result.unwrap_err();
        assert!(e.contains("did not end after 4 pages"), "{e}");
    }
}
