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
}

impl Pager {
    /// A listing asking for `page_size` resources per page.
    pub fn new(page_size: usize) -> Pager {
        Pager {
            requested: page_size.max(1),
            start: 1,
            pages: 0,
            limit: MAX_PAGES,
            last_start_index: None,
            seen: HashSet::new(),
            listed: 0,
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
        self.listed += fresh.len();
        if fresh.is_empty() {
            return Err(format!(
                "page {} (startIndex {}) brings no resource not listed before",
                self.pages, self.start
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
        if self.pages >= self.limit {
            return Err(format!(
                "the listing did not end after {} pages ({} resources of the {} totalResults announced)",
                self.pages,
                self.listed,
                page.total_results
                    .map_or_else(|| "unknown".to_string(), |t| t.to_string())
            ));
        }
        self.start += got;
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
        }
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
