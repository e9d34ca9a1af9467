"""The Flower engine: a ServerApp and a ClientApp that only translate between Flower records and our objects.

- `records`: the messages' record keys and the codec between records and our objects (tensors, RunConfig);
- `client_app`: the ClientApp (`client_app`), which trains and scores the clients a node serves;
- `strategy`: the server's Strategy (`FedDATStrategy`), one round's messages and their aggregation;
- `server_app`: the ServerApp (`server_app`, `make_server_app`, `serve`) and `run_flower`;
- `secagg`: secure aggregation of the shared adapter with SecAgg+.

The ML stays where the in-process engine has it: `Worker` trains and scores one client, `aggregate()` validates
and averages updates, `History` records the run. Flower carries the messages (flwr >= 1.41 Message API):

- query     server -> every node, once: the run config. Reply: the node's client index and name, its label
            space, its training count (fixed for the run: the FedAvg weight) and the starting global adapter
            (every node computes the same one from the seed).
- train     server -> every client, each round: the global adapter ("arrays") and the round ("config":
            server-round, resumed-from, and attempt on a retry).
            Reply: the updated global adapter ("arrays"; empty when the method shares nothing) and
            "metrics": num-examples, client-index and the mean train losses as train.<name>.
- evaluate  server -> every client, on evaluation rounds: the new global adapter. Reply: "metrics" with
            the score; on the last round ("final") also score.<view> for every reported view, the per-item
            scores and breakdown.<key> of the predicting view; when the server saves the run ("export",
            set when it has an out dir) also the client's personalised model ("arrays") and its description
            ("client" record, "model-meta": client.json as JSON), which the server writes to
            <out>/clients/<client>/ exactly as the in-process engine does. Without an out dir no private
            state leaves a node.

With `nodes = N` every SuperNode brings its own client folder (node config `data=PATH`, optional `name=`,
`out=`) and the server holds no data: the query is asked twice, first for the client's name, training count,
task kind and the starting global adapter, then (the clients numbered in name order) to give each node its
index, which every later message repeats ("client-index" in "config"). Its replies carry no label space, no
per-item scores and no model: a node's final evaluation sends only numbers (scores per view and question type,
val-score and item-var, its part of the standard error) and writes its model and its own results.json under
its `out` (`save_node_client`). The server logs what every reply held (records, array keys, metric types) to
`<out>/received.jsonl`.

Every message also carries the run config ("run-config"), so the server is the one source of truth and the
ClientApp needs nothing from Flower's own run config. A node's client is its `partition-id` (simulation) or
`client-id` (deployment, `--node-config "client-id=0"`); node-local settings (model-path, cache-dir, device,
threads, client-state-dir) may be overridden by the node config. A client's private state (its local adapters,
head and the method's other private tensors) follows the in-process engine's rule
(feddat.federation.client_state): with client-state-dir set it lives only in the node's files between the
client's rounds (so the run can be resumed, `serve(resume=...)`); with more than 32 clients, only in files of a
temporary directory named by the run, removed as the clients finish; else in `context.state`. One backbone is
built per process whatever the number of clients it serves.

A round's train replies go to the same `RoundCollector` as in the in-process engine (feddat.federation.server):
error replies and clients silent past the timeout are missing, bad updates rejected, the missing ones asked
again (train config "attempt") when too few usable results came back; the ClientApp applies the run's
fault injection (feddat.federation.faults) as the in-process engine does. An error the SuperLink sends for a
node it counts as gone ("Node Unavailable") is the missing answer of that node's client. With
secure-aggregation the round's train messages are those of Flower's SecAgg+ protocol instead, and the server
gets the clients' metrics and the mean change of the global adapter only (feddat.federation.flower.secagg).

`run_flower(cfg)` (server_app) runs this app on Flower's simulation engine in this process and returns the same
results dict as the in-process engine; `flwr run .` runs it from pyproject.toml ([tool.flwr.app.components]).
"""
