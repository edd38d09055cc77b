// An independent client: Node's `ws` speaks the chat protocol to a running shoal.
// Usage: node chat_client.mjs ws://host:port/ws
// Prints one JSON line per received message, tagged with the client's name.
import WebSocket from "ws";

const base = process.argv[2];

function open(user) {
  const ws = new WebSocket(`${base}?user_id=${user}`);
  const queue = [];
  const waiters = [];
  ws.on("message", (data, isBinary) => {
    const message = isBinary ? { binary: Buffer.from(data).toString("hex") } : JSON.parse(data);
    console.log(JSON.stringify({ client: user, message }));
    const waiter = waiters.shift();
    if (waiter) waiter(message);
    else queue.push(message);
  });
  const next = () =>
    new Promise((resolve, reject) => {
      if (queue.length) return resolve(queue.shift());
      const timer = setTimeout(() => reject(new Error(`${user}: no message in 5s`)), 5000);
      waiters.push((m) => { clearTimeout(timer); resolve(m); });
    });
  const opened = new Promise((resolve, reject) => { ws.on("open", resolve); ws.on("error", reject); });
  return { ws, next, opened, send: (m) => ws.send(JSON.stringify(m)) };
}

const ann = open("ann");
const bo = open("bo");
await Promise.all([ann.opened, bo.opened]);
await ann.next(); // welcome
await bo.next();
ann.send({ type: "join_room", room: "node" });
await ann.next(); // joined_room
bo.send({ type: "join_room", room: "node" });
await bo.next(); // joined_room
await ann.next(); // user_joined_room
bo.send({ type: "room_message", room: "node", message: { from: "node ws" } });
await ann.next();
await bo.next();
ann.ws.send("not json");
await ann.next();
ann.ws.send(Buffer.from([0, 1, 2, 255]), { binary: true });
await ann.next();
ann.ws.close(1000);
bo.ws.close(1000);
