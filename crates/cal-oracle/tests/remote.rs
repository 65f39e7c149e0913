//! The HTTP oracles against a local server (wiremock on 127.0.0.1) that speaks the
//! OpenAI Chat Completions and Gemini generateContent wire formats.

use cal_core::locate::LocateConfig;
use cal_oracle::cache::Cache;
use cal_oracle::remote::{Api, RemoteConfig, RemoteOracle};
use cal_oracle::{locate_error, OracleFailure, OracleRequest, SpanOutcome};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const KEY: &str = "sk-test-SECRET-0123456789";

fn req() -> OracleRequest {
    OracleRequest {
        question: "A baker makes 24 muffins and sells 3 boxes of 6. How many are left?".into(),
        reference: "3 * 6 = <<3*6=18>>18\n24 - 18 = <<24-18=6>>6\n#### 6".into(),
        response: "She sells 3 * 6 = 16 muffins. So 24 - 16 = 8 are left.\n#### 8".into(),
    }
}

fn model(api: Api) -> &'static str {
    match api {
        Api::OpenAi => "gpt-4o-mini",
        Api::Gemini => "gemini-2.0-flash",
    }
}

fn endpoint(api: Api) -> String {
    match api {
        Api::OpenAi => "/v1/chat/completions".into(),
        Api::Gemini => format!("/v1beta/models/{}:generateContent", model(api)),
    }
}

/// A success body in the provider's format whose model output is `content`.
fn ok_body(api: Api, content: &str) -> Value {
    match api {
        Api::OpenAi => json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 20, "total_tokens": 1020}
        }),
        Api::Gemini => json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": content}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 20, "totalTokenCount": 1020}
        }),
    }
}

fn good(api: Api) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(ok_body(api, r#"{"first_error": "3 * 6 = 16"}"#))
}

fn config(server: &MockServer, api: Api) -> RemoteConfig {
    let suffix = match api {
        Api::OpenAi => "/v1",
        Api::Gemini => "/v1beta",
    };
    RemoteConfig {
        base_url: Some(format!("{}{suffix}", server.uri())),
        timeout: Duration::from_millis(400),
        max_attempts: 3,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..RemoteConfig::default()
    }
}

async fn mount(
    server: &MockServer,
    api: Api,
    template: ResponseTemplate,
    times: Option<u64>,
    priority: u8,
) {
    let mut m = Mock::given(method("POST")).and(path(endpoint(api)));
    m = match api {
        Api::OpenAi => m.and(header("authorization", format!("Bearer {KEY}").as_str())),
        Api::Gemini => m.and(header("x-goog-api-key", KEY)),
    };
    let mut mock = m.respond_with(template).with_priority(priority);
    if let Some(n) = times {
        mock = mock.up_to_n_times(n);
    }
    mock.mount(server).await;
}

async fn run(
    server: &MockServer,
    api: Api,
    cfg: RemoteConfig,
    cache: Option<Arc<Cache>>,
) -> SpanOutcome {
    let oracle = RemoteOracle::new(api, model(api), Some(KEY.into()), cfg, cache);
    let _ = server;
    locate_error(&oracle, &req(), &LocateConfig::default()).await
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap()
}

fn assert_no_key(what: &impl std::fmt::Debug) {
    let s = format!("{what:?}");
    assert!(!s.contains(KEY) && !s.contains("SECRET"), "key leaked: {s}");
}

const APIS: [Api; 2] = [Api::OpenAi, Api::Gemini];

#[tokio::test]
async fn normal_answer_and_wire_format() {
    for api in APIS {
        let server = MockServer::start().await;
        mount(&server, api, good(api), None, 1).await;
        let out = run(&server, api, config(&server, api), None).await;
        let SpanOutcome::Located {
            located,
            segment,
            usage,
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(segment, "3 * 6 = 16");
        assert_eq!(&req().response[located.start..located.end], "3 * 6 = 16");
        assert_eq!(
            (
                usage.attempts,
                usage.input_tokens,
                usage.output_tokens,
                usage.cached
            ),
            (1, 1000, 20, false)
        );
        assert!(usage.cost_usd > 0.0);
        let reqs = requests(&server).await;
        assert_eq!(reqs.len(), 1);
        assert!(
            !reqs[0].url.as_str().contains(KEY),
            "key must not be in the URL"
        );
        let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
        match api {
            Api::OpenAi => {
                assert_eq!(body["model"], "gpt-4o-mini");
                assert_eq!(body["temperature"], 0);
                assert_eq!(body["response_format"]["type"], "json_object");
                let msgs = body["messages"].as_array().unwrap();
                assert_eq!(msgs[0]["role"], "system");
                assert!(msgs.last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .contains("3 * 6 = 16 muffins"));
                assert!(
                    msgs.iter().any(|m| m["role"] == "assistant"),
                    "few-shot examples are sent"
                );
            }
            Api::Gemini => {
                assert!(body["systemInstruction"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
                    .contains("FIRST"));
                assert_eq!(
                    body["generationConfig"]["responseMimeType"],
                    "application/json"
                );
                assert_eq!(body["generationConfig"]["temperature"], 0);
                let contents = body["contents"].as_array().unwrap();
                assert_eq!(contents.last().unwrap()["role"], "user");
                assert!(contents.iter().any(|c| c["role"] == "model"));
            }
        }
        assert_no_key(&out);
    }
}

#[tokio::test]
async fn retry_after_is_honoured() {
    for api in APIS {
        let server = MockServer::start().await;
        mount(
            &server,
            api,
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            Some(1),
            1,
        )
        .await;
        mount(&server, api, good(api), None, 2).await;
        let t0 = Instant::now();
        let out = run(&server, api, config(&server, api), None).await;
        let waited = t0.elapsed();
        assert!(
            matches!(&out, SpanOutcome::Located { usage, .. } if usage.attempts == 2),
            "{out:?}"
        );
        assert!(
            waited >= Duration::from_millis(950),
            "Retry-After: 1 not honoured ({waited:?})"
        );
        assert_eq!(requests(&server).await.len(), 2);
    }
}

#[tokio::test]
async fn server_error_then_success() {
    for api in APIS {
        let server = MockServer::start().await;
        mount(
            &server,
            api,
            ResponseTemplate::new(500).set_body_string("overloaded"),
            Some(1),
            1,
        )
        .await;
        mount(&server, api, good(api), None, 2).await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(&out, SpanOutcome::Located { usage, .. } if usage.attempts == 2),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 2);
    }
}

#[tokio::test]
async fn persistent_5xx_gives_up_after_max_attempts() {
    let api = Api::OpenAi;
    let server = MockServer::start().await;
    mount(&server, api, ResponseTemplate::new(503), None, 1).await;
    let out = run(&server, api, config(&server, api), None).await;
    assert!(
        matches!(
            &out,
            SpanOutcome::Failed {
                failure: OracleFailure::Http {
                    status: 503,
                    attempts: 3,
                    ..
                }
            }
        ),
        "{out:?}"
    );
    assert_eq!(requests(&server).await.len(), 3);
}

#[tokio::test]
async fn timeout_retries_then_fails() {
    for api in APIS {
        let server = MockServer::start().await;
        mount(
            &server,
            api,
            good(api).set_delay(Duration::from_secs(3)),
            None,
            1,
        )
        .await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(
                &out,
                SpanOutcome::Failed {
                    failure: OracleFailure::Timeout { attempts: 3 }
                }
            ),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 3);
    }
}

#[tokio::test]
async fn malformed_json_is_a_bad_reply_without_retry() {
    for api in APIS {
        let server = MockServer::start().await;
        mount(
            &server,
            api,
            ResponseTemplate::new(200).set_body_string("{\"choices\": [oops"),
            None,
            1,
        )
        .await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(
                &out,
                SpanOutcome::Failed {
                    failure: OracleFailure::BadReply { .. }
                }
            ),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 1);

        // valid envelope, model output that is broken JSON
        let server = MockServer::start().await;
        let t = ResponseTemplate::new(200).set_body_json(ok_body(api, "{\"first_error\": \"3 * 6"));
        mount(&server, api, t, None, 1).await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(
                &out,
                SpanOutcome::Failed {
                    failure: OracleFailure::BadReply { .. }
                }
            ),
            "{out:?}"
        );
    }
}

#[tokio::test]
async fn segment_absent_from_response() {
    for api in APIS {
        let server = MockServer::start().await;
        let t = ResponseTemplate::new(200).set_body_json(ok_body(
            api,
            "```json\n{\"first_error\": \"The train leaves at noon from Paris\"}\n```",
        ));
        mount(&server, api, t, None, 1).await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(&out, SpanOutcome::NotLocated { segment, .. } if segment.contains("Paris")),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 1);
    }
}

#[tokio::test]
async fn ten_megabyte_body_is_refused() {
    for api in APIS {
        let server = MockServer::start().await;
        let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(10 << 20));
        mount(
            &server,
            api,
            ResponseTemplate::new(200).set_body_string(huge),
            None,
            1,
        )
        .await;
        let mut cfg = config(&server, api);
        cfg.timeout = Duration::from_secs(10);
        let out = run(&server, api, cfg, None).await;
        assert!(
            matches!(
                &out,
                SpanOutcome::Failed {
                    failure: OracleFailure::TooLarge { .. }
                }
            ),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 1);
    }
}

#[tokio::test]
async fn unauthorized_is_not_retried_and_key_not_leaked() {
    for api in APIS {
        let server = MockServer::start().await;
        let body = json!({"error": {"message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error"}});
        mount(
            &server,
            api,
            ResponseTemplate::new(401).set_body_json(body),
            None,
            1,
        )
        .await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(
            matches!(
                &out,
                SpanOutcome::Failed {
                    failure: OracleFailure::Auth { status: 401 }
                }
            ),
            "{out:?}"
        );
        assert_eq!(requests(&server).await.len(), 1);
        if let SpanOutcome::Failed { failure } = &out {
            assert!(!failure.to_string().contains(KEY));
        }
        assert_no_key(&out);

        // a 400 that echoes the key is redacted too, and not retried
        let server = MockServer::start().await;
        mount(
            &server,
            api,
            ResponseTemplate::new(400).set_body_string(format!("bad request from {KEY}")),
            None,
            1,
        )
        .await;
        let out = run(&server, api, config(&server, api), None).await;
        assert!(matches!(
            &out,
            SpanOutcome::Failed {
                failure: OracleFailure::Http {
                    status: 400,
                    attempts: 1,
                    ..
                }
            }
        ));
        assert_no_key(&out);
    }
}

#[tokio::test]
async fn cache_makes_second_run_free() {
    for api in APIS {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("oracle.sqlite");
        let server = MockServer::start().await;
        mount(&server, api, good(api), None, 1).await;
        let first = run(
            &server,
            api,
            config(&server, api),
            Some(Arc::new(Cache::open(&db).unwrap())),
        )
        .await;
        assert!(matches!(&first, SpanOutcome::Located { usage, .. } if !usage.cached));
        // a new process: reopen the cache file
        let second = run(
            &server,
            api,
            config(&server, api),
            Some(Arc::new(Cache::open(&db).unwrap())),
        )
        .await;
        let SpanOutcome::Located { usage, segment, .. } = &second else {
            panic!("{second:?}")
        };
        assert!(usage.cached && usage.attempts == 0 && usage.cost_usd == 0.0);
        assert_eq!(segment, "3 * 6 = 16");
        assert_eq!(
            requests(&server).await.len(),
            1,
            "second run must send zero requests"
        );
        let bytes = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("oracle.sqlite-wal")).unwrap_or_default();
        for b in [bytes, wal] {
            assert!(
                !String::from_utf8_lossy(&b).contains("SECRET"),
                "key stored in cache"
            );
        }
    }
}

#[tokio::test]
async fn budget_cap_stops_calls() {
    let api = Api::OpenAi;
    let server = MockServer::start().await;
    mount(&server, api, good(api), None, 1).await;
    let mut cfg = config(&server, api);
    cfg.max_cost = Some(1e-6); // one call (1000 in + 20 out at gpt-4o-mini prices) exceeds it
    let oracle = RemoteOracle::new(api, model(api), Some(KEY.into()), cfg, None);
    let first = locate_error(&oracle, &req(), &LocateConfig::default()).await;
    assert!(matches!(first, SpanOutcome::Located { .. }));
    let mut r2 = req();
    r2.response.push_str(" (again)");
    let second = locate_error(&oracle, &r2, &LocateConfig::default()).await;
    assert!(
        matches!(
            second,
            SpanOutcome::Failed {
                failure: OracleFailure::Budget { .. }
            }
        ),
        "{second:?}"
    );
    assert_eq!(requests(&server).await.len(), 1);
    assert!(oracle.spent() > 1e-6);
}

#[tokio::test]
async fn json_mode_falls_back_when_server_rejects_response_format() {
    let api = Api::OpenAi;
    let server = MockServer::start().await;
    let reject = ResponseTemplate::new(400)
        .set_body_string("{\"error\": \"response_format is not supported\"}");
    mount(&server, api, reject, Some(1), 1).await;
    mount(&server, api, good(api), None, 2).await;
    let out = run(&server, api, config(&server, api), None).await;
    assert!(matches!(&out, SpanOutcome::Located { .. }), "{out:?}");
    let reqs = requests(&server).await;
    assert_eq!(reqs.len(), 2);
    let second: Value = serde_json::from_slice(&reqs[1].body).unwrap();
    assert!(second.get("response_format").is_none());
}

#[tokio::test]
async fn missing_key_for_the_real_endpoint_fails_cleanly() {
    let oracle = RemoteOracle::new(
        Api::OpenAi,
        "gpt-4o-mini",
        None,
        RemoteConfig::default(),
        None,
    );
    let out = locate_error(&oracle, &req(), &LocateConfig::default()).await;
    assert!(matches!(
        out,
        SpanOutcome::Failed {
            failure: OracleFailure::MissingKey { .. }
        }
    ));
}

#[tokio::test]
async fn concurrent_requests_keep_order() {
    let api = Api::OpenAi;
    let server = MockServer::start().await;
    mount(
        &server,
        api,
        good(api).set_delay(Duration::from_millis(50)),
        None,
        1,
    )
    .await;
    let oracle: Arc<dyn cal_oracle::Oracle> = Arc::new(RemoteOracle::new(
        api,
        model(api),
        Some(KEY.into()),
        config(&server, api),
        None,
    ));
    let reqs: Vec<OracleRequest> = (0..12)
        .map(|i| {
            let mut r = req();
            r.response = format!("Item {i}. {}", r.response);
            r
        })
        .collect();
    let outs = cal_oracle::locate_all(oracle, reqs.clone(), LocateConfig::default()).await;
    assert_eq!(outs.len(), 12);
    for (o, r) in outs.iter().zip(&reqs) {
        let range = o.range().unwrap();
        assert_eq!(&r.response[range], "3 * 6 = 16");
    }
}

/// Replies in turn with the given model outputs (one per request, then the last).
struct InTurn(std::sync::Mutex<Vec<&'static str>>, Api);

impl wiremock::Respond for InTurn {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut left = self.0.lock().unwrap();
        let content = if left.len() > 1 {
            left.remove(0)
        } else {
            left[0]
        };
        ResponseTemplate::new(200).set_body_json(ok_body(self.1, content))
    }
}

#[tokio::test]
async fn votes_sample_at_a_temperature_and_keep_the_majority_span() {
    use cal_oracle::vote::VotingOracle;
    use cal_oracle::Oracle;
    for api in APIS {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("oracle.sqlite");
        let server = MockServer::start().await;
        let replies = vec![
            r#"{"first_error": "24 - 16 = 8"}"#,
            r#"{"first_error": "3 * 6 = 16"}"#,
            r#"{"first_error": "3 * 6 = 16."}"#,
        ];
        Mock::given(method("POST"))
            .and(path(endpoint(api)))
            .respond_with(InTurn(std::sync::Mutex::new(replies), api))
            .mount(&server)
            .await;
        let cfg = RemoteConfig {
            temperature: 0.7,
            concurrency: 1,
            ..config(&server, api)
        };
        let voting = |cfg: RemoteConfig| {
            let inner = RemoteOracle::new(
                api,
                model(api),
                Some(KEY.into()),
                cfg,
                Some(Arc::new(Cache::open(&db).unwrap())),
            );
            VotingOracle::new(Arc::new(inner), 3)
        };
        let reply = voting(cfg.clone()).first_error(&req()).await.unwrap();
        assert_eq!(
            reply.verdict,
            cal_oracle::Verdict::Segment {
                text: "3 * 6 = 16".into(),
                range: None
            },
            "{api:?}"
        );
        assert!(reply.raw.ends_with("(2 of 3 votes)"), "{}", reply.raw);
        assert_eq!(reply.usage.input_tokens, 3000);
        let sent = requests(&server).await;
        assert_eq!(sent.len(), 3);
        for r in &sent {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let t = match api {
                Api::OpenAi => &body["temperature"],
                Api::Gemini => &body["generationConfig"]["temperature"],
            };
            assert_eq!(t.as_f64(), Some(0.7), "{body}");
        }
        // every vote has its own cache entry: a rerun sends nothing and votes the same
        let again = voting(cfg.clone()).first_error(&req()).await.unwrap();
        assert_eq!(again.verdict, reply.verdict);
        assert!(again.usage.cached);
        assert_eq!(requests(&server).await.len(), 3);
        // another prompt variant (zero-shot) or temperature is another cache entry
        let zero_shot = RemoteConfig {
            few_shot: false,
            ..cfg.clone()
        };
        let r = voting(zero_shot).first_error(&req()).await.unwrap();
        assert!(!r.usage.cached);
        let sent = requests(&server).await;
        assert_eq!(sent.len(), 6);
        let body: Value = serde_json::from_slice(&sent[5].body).unwrap();
        let turns = match api {
            Api::OpenAi => body["messages"].as_array().unwrap().len(),
            Api::Gemini => body["contents"].as_array().unwrap().len(),
        };
        // zero-shot: the system prompt (Gemini: apart) and the request alone
        assert_eq!(turns, if api == Api::OpenAi { 2 } else { 1 }, "{body}");
    }
}
