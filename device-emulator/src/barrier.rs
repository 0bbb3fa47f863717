//! The transfer barrier of `run --transfer-barrier`, a benchmark switch: every device sends its
//! acceptance at once but holds its first chunk-window subscription until the whole fleet has
//! been offered the update, so the data phase in the summary (first to last chunk) times the
//! transfer alone, not the handshakes spread out before it. Off by default: a real device starts
//! pulling as soon as it accepts.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Opens when `total` devices have arrived.
#[derive(Debug)]
pub struct TransferBarrier {
    total: u64,
    arrived: AtomicU64,
    open: watch::Sender<bool>,
}

impl TransferBarrier {
    /// A closed barrier for `total` devices (open at once when `total` is 0).
    pub fn new(total: u64) -> Self {
        let (open, _) = watch::channel(total == 0);
        TransferBarrier {
            total,
            arrived: AtomicU64::new(0),
            open,
        }
    }

    /// One device was offered its update; call once per device.
    pub fn arrive(&self) {
        if self.arrived.fetch_add(1, Ordering::Relaxed) + 1 >= self.total {
            self.open.send_replace(true);
        }
    }

    /// Waits until every device has arrived.
    pub async fn wait(&self) {
        let mut open = self.open.subscribe();
        // The sender lives as long as the barrier, so this cannot fail while we wait.
        let _ = open.wait_for(|open| *open).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn opens_when_the_last_device_arrives() {
        let barrier = Arc::new(TransferBarrier::new(2));
        let waiter = tokio::spawn({
            let barrier = Arc::clone(&barrier);
            async move { barrier.wait().await }
        });
        barrier.arrive();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "open after 1 of 2");
        barrier.arrive();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("open after 2 of 2")
            .unwrap();
        // Late waiters pass at once.
        tokio::time::timeout(Duration::from_secs(1), barrier.wait())
            .await
            .expect("stays open");
    }
}
