//! Migrations and the storage-side fencing functions, on a private Postgres cluster.
mod common;

use common::postgres::PostgresServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_twice_and_concurrently_without_error() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let (a, b) = tokio::join!(lockstep::db::migrate(&url), lockstep::db::migrate(&url));
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(
        a.len() + b.len(),
        4,
        "each migration applied exactly once: {a:?} {b:?}"
    );
    assert!(lockstep::db::migrate(&url).await.expect("again").is_empty());
    assert_eq!(
        pg.psql("SELECT count(*) FROM lockstep.refinery_schema_history"),
        "4"
    );
}

async fn client(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// `fence_check(room, resource, token)`: `Ok(bool)`, or the SQLSTATE it raised.
async fn check(
    db: &tokio_postgres::Client,
    room: &str,
    res: &str,
    token: i64,
) -> Result<bool, String> {
    match db
        .query_one(
            "SELECT lockstep.fence_check($1, $2, $3)",
            &[&room, &res, &token],
        )
        .await
    {
        Ok(row) => Ok(row.get(0)),
        Err(e) => Err(e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// V3 `fence_check` accepts only issued tokens and never writes: the registered token is
/// true, a lower one false, a higher one or an unregistered lock raises LS001 ("never
/// issued"). Locks are (room, resource). The V2 two-argument version raises LS002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_check_accepts_only_issued_tokens_and_never_writes() {
    let pg = PostgresServer::start();
    lockstep::db::migrate(&pg.url()).await.unwrap();
    let db = client(&pg).await;
    let (room, res) = ("scene:1", "segment:1");
    assert_eq!(
        check(&db, room, res, 10).await,
        Err("LS001".into()),
        "nothing registered"
    );
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('scene:1', 'segment:1', 10)"),
        "t"
    );
    assert_eq!(check(&db, room, res, 10).await, Ok(true));
    assert_eq!(
        check(&db, room, res, 10).await,
        Ok(true),
        "the holder writes again"
    );
    assert_eq!(check(&db, room, res, 9).await, Ok(false), "stale");
    for forged in [11, 1 << 53, i64::MAX] {
        assert_eq!(
            check(&db, room, res, forged).await,
            Err("LS001".into()),
            "{forged}"
        );
    }
    assert_eq!(
        check(&db, "scene:2", res, 10).await,
        Err("LS001".into()),
        "another room's lock"
    );
    assert_eq!(
        pg.psql(
            "SELECT token FROM lockstep.fences WHERE room = 'scene:1' AND resource = 'segment:1'"
        ),
        "10",
        "fence_check never writes"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM lockstep.fences"), "1");
    // Registration still needs a higher token, and moves the check along.
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('scene:1', 'segment:1', 10)"),
        "f",
        "not above"
    );
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('scene:1', 'segment:1', 13)"),
        "t"
    );
    assert_eq!(check(&db, room, res, 10).await, Ok(false));
    assert_eq!(check(&db, room, res, 13).await, Ok(true));
    // Another room's lock on the same resource is independent.
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('scene:2', 'segment:1', 5)"),
        "t"
    );
    assert_eq!(check(&db, "scene:2", res, 5).await, Ok(true));

    // The V2 signature fails loudly.
    let old = db
        .query_one("SELECT lockstep.fence_check($1, $2)", &[&res, &13i64])
        .await
        .expect_err("the two-argument fence_check is gone");
    assert_eq!(old.code().map(|c| c.code()), Some("LS002"), "{old}");

    // Retention: rows whose token is below the bound go, the others stay.
    assert_eq!(pg.psql("SELECT lockstep.fence_prune(10)"), "1");
    assert_eq!(
        pg.psql("SELECT room FROM lockstep.fences ORDER BY room"),
        "scene:1"
    );
}
