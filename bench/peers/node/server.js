// Minimal Node `ws` peer speaking shoal's protocol subset, single process,
// perMessageDeflate off. Usage: node server.js [--port 9002] [--host H] [--echo]
// --echo echoes every frame verbatim (raw transport comparisons).
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

function option(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const port = Number(option('--port', '9002'));
const host = option('--host', '127.0.0.1');
const rawEcho = process.argv.includes('--echo');

const users = new Map(); // user id -> Set of sockets
const rooms = new Map(); // room -> Set of sockets
let nextId = 1;

function send(ws, text) {
  if (ws.readyState === WebSocket.OPEN) ws.send(text);
}

function handle(ws, user, joined, data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    send(ws, '{"type":"error","message":"Invalid message format"}');
    return;
  }
  if (msg === null || typeof msg !== 'object') {
    send(ws, '{"type":"error","message":"Invalid message format"}');
    return;
  }
  const now = Date.now();
  switch (msg.type) {
    case 'join_room': {
      const room = String(msg.room);
      if (!rooms.has(room)) rooms.set(room, new Set());
      const members = rooms.get(room);
      const others = [...members];
      members.add(ws);
      joined.add(room);
      const names = [...users.entries()]
        .filter(([, conns]) => [...conns].some((c) => members.has(c)))
        .map(([name]) => name);
      send(ws, JSON.stringify({ type: 'joined_room', room, members: names,
        total_members: names.length }));
      const note = JSON.stringify({ type: 'user_joined_room', user_id: user, room,
        total_members: members.size });
      for (const other of others) send(other, note);
      break;
    }
    case 'room_message': {
      const room = String(msg.room);
      const out = JSON.stringify({ type: 'room_message', from: user, room,
        message: msg.message, timestamp: now });
      for (const member of rooms.get(room) || []) send(member, out);
      break;
    }
    case 'broadcast': {
      const out = JSON.stringify({ type: 'broadcast', from: user, message: msg.message,
        timestamp: now });
      for (const other of wss.clients) if (other !== ws) send(other, out);
      break;
    }
    case 'private': {
      const target = users.get(String(msg.to));
      if (!target) {
        send(ws, '{"type":"error","message":"User not found"}');
        break;
      }
      const out = JSON.stringify({ type: 'private_message', from: user, message: msg.message,
        timestamp: now });
      for (const conn of target) send(conn, out);
      send(ws, JSON.stringify({ type: 'message_sent', to: String(msg.to), timestamp: now }));
      break;
    }
    default:
      send(ws, JSON.stringify({ type: 'echo', data: msg }));
  }
}

const wss = new WebSocketServer({ host, port, perMessageDeflate: false, clientTracking: true });

wss.on('connection', (ws, req) => {
  if (rawEcho) {
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
    return;
  }
  const query = new URL(req.url, 'http://localhost').searchParams;
  const user = query.get('user_id') || `user-${nextId++}`;
  const joined = new Set();
  if (!users.has(user)) users.set(user, new Set());
  users.get(user).add(ws);
  send(ws, JSON.stringify({ type: 'welcome', user_id: user, connection_id: String(nextId++) }));
  ws.on('message', (data) => handle(ws, user, joined, data.toString()));
  ws.on('close', () => {
    const conns = users.get(user);
    conns.delete(ws);
    if (conns.size === 0) users.delete(user);
    for (const room of joined) rooms.get(room).delete(ws);
  });
});

wss.on('listening', () => console.log(`listening ${wss.address().port}`));
