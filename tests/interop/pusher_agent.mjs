// The official Pusher clients, pusher-js and Laravel Echo, driven by shoal's tests.
//
// Usage: node pusher_agent.mjs '{"key": ..., "host": ..., "port": ..., "authEndpoint": ...,
//                               "userAuthEndpoint": ..., "echo": false}'
// Reads one command per line on stdin (JSON, see `run` below) and prints one JSON line
// per thing the client sees: connection states, its socket id, every event on every
// channel it subscribed to, presence callbacks, errors. Nothing of shoal's code runs
// here: what the tests check is what a browser app using these libraries would see.
import readline from "node:readline";
import Pusher from "pusher-js";
import Echo from "laravel-echo";

const options = JSON.parse(process.argv[2]);
const emit = (thing) => console.log(JSON.stringify(thing));

const settings = {
  cluster: "",
  wsHost: options.host,
  wsPort: options.port,
  forceTLS: false,
  enabledTransports: ["ws"],
  disableStats: true,
  channelAuthorization: { endpoint: options.authEndpoint, transport: "ajax" },
  userAuthentication: { endpoint: options.userAuthEndpoint, transport: "ajax" },
};

let pusher;
let echo = null;
if (options.echo) {
  echo = new Echo({
    broadcaster: "reverb",
    key: options.key,
    wsHost: options.host,
    wsPort: options.port,
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    authEndpoint: options.authEndpoint,
    Pusher,
  });
  pusher = echo.connector.pusher;
} else {
  pusher = new Pusher(options.key, settings);
}

pusher.connection.bind("state_change", ({ previous, current }) =>
  emit({ type: "state", previous, current }));
pusher.connection.bind("connected", () =>
  emit({ type: "connected", socket_id: pusher.connection.socket_id }));
pusher.connection.bind("error", (error) =>
  emit({ type: "connection_error", error: error?.error?.data ?? error?.type ?? String(error) }));
pusher.user.bind_global((event, data) => emit({ type: "user_event", event, data }));

function listen(channel) {
  channel.bind_global((event, data) => emit({ type: "event", channel: channel.name, event, data }));
}

function run(command) {
  switch (command.op) {
    case "subscribe":
      listen(pusher.subscribe(command.channel));
      break;
    case "unsubscribe":
      pusher.unsubscribe(command.channel);
      break;
    case "trigger":
      emit({ type: "triggered", ok: pusher.channel(command.channel).trigger(command.event, command.data) });
      break;
    case "members": {
      const members = pusher.channel(command.channel).members;
      const ids = [];
      members.each((member) => ids.push(member.id));
      emit({ type: "members", channel: command.channel, ids: ids.sort(), count: members.count, me: members.me });
      break;
    }
    case "signin":
      pusher.signin();
      pusher.user.signinDonePromise.then(() =>
        emit({ type: "signed_in", user_data: pusher.user.user_data }));
      break;
    case "disconnect":
      pusher.disconnect();
      break;
    case "echo_join":
      echo.join(command.channel)
        .here((users) => emit({ type: "here", channel: command.channel, users }))
        .joining((user) => emit({ type: "joining", channel: command.channel, user }))
        .leaving((user) => emit({ type: "leaving", channel: command.channel, user }))
        .listen(command.event, (data) => emit({ type: "echo_event", channel: command.channel, data }))
        .listenForWhisper("typing", (data) => emit({ type: "whisper", channel: command.channel, data }))
        .error((error) => emit({ type: "echo_error", channel: command.channel, error }));
      break;
    case "echo_private":
      echo.private(command.channel)
        .listen(command.event, (data) => emit({ type: "echo_event", channel: command.channel, data }))
        .error((error) => emit({ type: "echo_error", channel: command.channel, error }));
      break;
    case "echo_channel":
      echo.channel(command.channel)
        .listen(command.event, (data) => emit({ type: "echo_event", channel: command.channel, data }));
      break;
    case "echo_whisper":
      echo.join(command.channel).whisper("typing", command.data);
      break;
    case "exit":
      pusher.disconnect();
      process.exit(0);
      break;
    default:
      emit({ type: "agent_error", error: `unknown op ${command.op}` });
  }
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  try {
    run(JSON.parse(line));
  } catch (error) {
    emit({ type: "agent_error", error: String(error) });
  }
});
