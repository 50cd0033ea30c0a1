//! The size of the future an `async fn` returns, read from its type alone: for the
//! tests that keep the per-request and per-connection futures small. A future is
//! copied whole each time it moves (into a task when spawned, into hyper's dispatcher
//! for every request), and its size is that of its largest state, so a large step
//! that runs rarely (a TLS handshake, an upgrade) held inline costs every request.

/// Of an `async fn` of two arguments.
pub fn of2<A, B, F, Fut>(_: &F) -> usize
where
    F: FnOnce(A, B) -> Fut,
{
    std::mem::size_of::<Fut>()
}

/// Of an `async fn` of four arguments.
pub fn of4<A, B, C, D, F, Fut>(_: &F) -> usize
where
    F: FnOnce(A, B, C, D) -> Fut,
{
    std::mem::size_of::<Fut>()
}

/// Of an `async fn` of five arguments.
pub fn of5<A, B, C, D, E, F, Fut>(_: &F) -> usize
where
    F: FnOnce(A, B, C, D, E) -> Fut,
{
    std::mem::size_of::<Fut>()
}
