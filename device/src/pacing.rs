//! Connection pacing, so thousands of devices do not stampede the broker: connection attempts
//! (first connects and reconnects alike) start at most `rate` per second, and at most
//! `max_in_flight` TLS + MQTT handshakes run at once. A permit is held until the handshake
//! ends (CONNACK or failure).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Shared by every device of a fleet.
#[derive(Debug)]
pub struct ConnectPacer {
    interval: Duration,
    next_slot: Mutex<Instant>,
    in_flight: Arc<Semaphore>,
}

/// Held while one handshake runs.
#[derive(Debug)]
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
}

impl ConnectPacer {
    /// At most `rate` attempts per second (> 0) and `max_in_flight` concurrent handshakes (> 0).
    pub fn new(rate: f64, max_in_flight: usize) -> Self {
        ConnectPacer {
            interval: Duration::from_secs_f64(1.0 / rate.max(f64::MIN_POSITIVE)),
            next_slot: Mutex::new(Instant::now()),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// Waits for this device's turn to connect.
    pub async fn acquire(&self) -> HandshakePermit {
        let slot = {
            let mut next = self.next_slot.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .expect("the pacer's semaphore is never closed");
        HandshakePermit { _permit: permit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn attempts_are_spaced_by_the_rate() {
        let pacer = Arc::new(ConnectPacer::new(100.0, 1000));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let pacer = Arc::clone(&pacer);
            tasks.push(tokio::spawn(async move {
                let _permit = pacer.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap() - start);
        }
        times.sort();
        // 50 attempts at 100/s: the last starts 490 ms after the first.
        assert_eq!(times[0], Duration::ZERO);
        assert_eq!(times[49], Duration::from_millis(490));
    }

    #[tokio::test(start_paused = true)]
    async fn handshakes_in_flight_are_bounded() {
        let pacer = Arc::new(ConnectPacer::new(1_000_000.0, 2));
        let first = pacer.acquire().await;
        let _second = pacer.acquire().await;
        let third = tokio::spawn({
            let pacer = Arc::clone(&pacer);
            async move { pacer.acquire().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!third.is_finished(), "a third handshake waits");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("released permit lets the third in")
            .unwrap();
    }
}
