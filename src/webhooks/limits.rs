//! The places for webhook requests on one replica, shared by the deliverer and by
//! test deliveries: at most `concurrency` requests in flight, at most
//! `per_endpoint` to any one endpoint and at most `per_owner` to the endpoints of any
//! one owner. So one receiver that hangs holds only its endpoint's share, one tenant's
//! many hanging receivers only that tenant's share, and a test delivery cannot open
//! more connections than deliveries may.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The bounds, from the `--webhook-concurrency*` flags (each at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryBounds {
    /// Requests in flight on the replica.
    pub concurrency: usize,
    /// Requests in flight to one endpoint.
    pub per_endpoint: usize,
    /// Requests in flight to one owner's endpoints.
    pub per_owner: usize,
}

/// Which bound a refused request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every place of the replica is taken.
    Replica,
    /// The endpoint has all it may have in flight.
    Endpoint,
    /// The endpoint's owner has all it may have in flight.
    Owner,
}

#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    endpoints: HashMap<String, usize>,
    owners: HashMap<String, usize>,
}

/// The places in flight, counted per endpoint and per owner.
#[derive(Debug)]
pub struct DeliveryLimits {
    bounds: DeliveryBounds,
    in_flight: Mutex<InFlight>,
}

impl DeliveryLimits {
    /// Limits with these bounds (a bound of 0 counts as 1).
    pub fn new(bounds: DeliveryBounds) -> Arc<DeliveryLimits> {
        Arc::new(DeliveryLimits {
            bounds: DeliveryBounds {
                concurrency: bounds.concurrency.max(1),
                per_endpoint: bounds.per_endpoint.max(1),
                per_owner: bounds.per_owner.max(1),
            },
            in_flight: Mutex::default(),
        })
    }

    /// The bounds.
    pub fn bounds(&self) -> DeliveryBounds {
        self.bounds
    }

    /// A place for one request to `endpoint_id` of `owner`, or which bound is met.
    pub fn take(self: &Arc<Self>, endpoint_id: &str, owner: &str) -> Result<Place, Full> {
        let mut in_flight = self.lock();
        if in_flight.total >= self.bounds.concurrency {
            return Err(Full::Replica);
        }
        if in_flight.endpoints.get(endpoint_id).copied().unwrap_or(0) >= self.bounds.per_endpoint {
            return Err(Full::Endpoint);
        }
        if in_flight.owners.get(owner).copied().unwrap_or(0) >= self.bounds.per_owner {
            return Err(Full::Owner);
        }
        in_flight.total += 1;
        *in_flight
            .endpoints
            .entry(endpoint_id.to_owned())
            .or_default() += 1;
        *in_flight.owners.entry(owner.to_owned()).or_default() += 1;
        Ok(Place {
            limits: self.clone(),
            endpoint_id: endpoint_id.to_owned(),
            owner: owner.to_owned(),
        })
    }

    /// Places free on the replica.
    pub fn free(&self) -> usize {
        self.bounds.concurrency.saturating_sub(self.lock().total)
    }

    /// The endpoints and the owners that have all they may have in flight: a claim
    /// leaves their deliveries for later.
    pub fn full(&self) -> (Vec<String>, Vec<String>) {
        let in_flight = self.lock();
        let full = |counts: &HashMap<String, usize>, bound: usize| {
            counts
                .iter()
                .filter(|(_, count)| **count >= bound)
                .map(|(id, _)| id.clone())
                .collect()
        };
        (
            full(&in_flight.endpoints, self.bounds.per_endpoint),
            full(&in_flight.owners, self.bounds.per_owner),
        )
    }

    fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One request's place; given back when dropped.
#[derive(Debug)]
pub struct Place {
    limits: Arc<DeliveryLimits>,
    endpoint_id: String,
    owner: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut in_flight = self.limits.lock();
        in_flight.total -= 1;
        release(&mut in_flight.endpoints, &self.endpoint_id);
        release(&mut in_flight.owners, &self.owner);
    }
}

/// One fewer in flight for `key`; its entry goes when none is left, so the maps hold
/// only what is in flight (bounded by `concurrency`).
fn release(counts: &mut HashMap<String, usize>, key: &str) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Arc<DeliveryLimits> {
        DeliveryLimits::new(DeliveryBounds {
            concurrency: 5,
            per_endpoint: 2,
            per_owner: 3,
        })
    }

    #[test]
    fn each_bound_holds_and_places_come_back() {
        let limits = limits();
        let a1 = limits.take("we_1", "alice").unwrap();
        let _a2 = limits.take("we_1", "alice").unwrap();
        assert_eq!(limits.take("we_1", "alice").unwrap_err(), Full::Endpoint);
        let _a3 = limits.take("we_2", "alice").unwrap();
        assert_eq!(limits.take("we_3", "alice").unwrap_err(), Full::Owner);
        assert_eq!(
            limits.full(),
            (vec!["we_1".to_owned()], vec!["alice".to_owned()])
        );
        let _b1 = limits.take("we_4", "bob").unwrap();
        let _b2 = limits.take("we_5", "bob").unwrap();
        assert_eq!(limits.free(), 0);
        assert_eq!(limits.take("we_6", "carol").unwrap_err(), Full::Replica);
        drop(a1);
        assert_eq!(limits.free(), 1);
        assert!(limits.full().0.is_empty());
        assert!(limits.full().1.is_empty());
        assert!(limits.take("we_3", "alice").is_ok());
    }

    #[test]
    fn the_counts_hold_only_what_is_in_flight() {
        let limits = limits();
        for i in 0..1_000 {
            drop(
                limits
                    .take(&format!("we_{i}"), &format!("owner_{i}"))
                    .unwrap(),
            );
        }
        let in_flight = limits.lock();
        assert_eq!(in_flight.total, 0);
        assert!(in_flight.endpoints.is_empty() && in_flight.owners.is_empty());
    }
}
