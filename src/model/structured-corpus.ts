/**
 * A seeded generator of chat conversations with long-range structure, for the embedded base model
 * that the project trains itself (scripts/build_structured_model.py, `npm run build:structured-model`).
 *
 * Every answer is a deterministic function of the user prompt (a system message, when present,
 * never changes it), so a model that has learned the corpus answers a held-out prompt exactly, and
 * we can check it. The answers are templated but combinatorial, so they are not a lookup table:
 *
 *   story   "Tell me a story about Mia and the red key in the garden." -> a story that names the
 *           hero, the object and the place again and again (copying from the prompt, he/she by name).
 *   facts   "Give me 4 facts about owls." -> a fact sheet (home, food, legs, sound: attributes the
 *           model memorises per animal) followed by a numbered list of n facts that repeat them.
 *   count   "Count from 17 to 29." / "Count down from 40 to 31." / "Count by twos from 8 to 20."
 *   list    "List 5 fruits." / "Name 4 days of the week, starting with Friday." (numbered, cyclic).
 *   repeat  "Repeat this three times: blue stone sings softly" -> the phrase, numbered, n times.
 *
 * Held-out prompts (data/prompts/structured.jsonl) come from their own seed stream and every
 * training conversation whose user prompt equals a held-out prompt is dropped, so the held-out
 * set is never seen in training.
 *
 * The tokenizer: the project's byte-level BPE (`trainByteLevelBpe`, same specials, ChatML template
 * and tokenizer.json layout as `buildTinyTokenizer`) trained on this corpus's text to
 * STRUCTURED_VOCAB_SIZE tokens, so that most words are one token.
 */
import { fail } from '../errors.js';
import { Rng } from './sampling.js';
import { TINY_SPECIAL_TOKENS, buildTinyTokenizer, trainByteLevelBpe, type TinyTokenizer } from './tiny-tokenizer.js';

export const STRUCTURED_VOCAB_SIZE = 1024;
/** Seed of the training conversations; held-out prompts use HELDOUT_SEED. */
export const STRUCTURED_SEED = 20240917;
export const HELDOUT_SEED = 77;
export const STRUCTURED_TASKS = ['story', 'facts', 'count', 'list', 'repeat'] as const;
export type StructuredTask = (typeof STRUCTURED_TASKS)[number];

export interface StructuredSample {
  task: StructuredTask;
  /** Optional system message (does not change the answer). */
  system?: string;
  prompt: string;
  answer: string;
}

const SYSTEMS = [
  'You are a helpful assistant.',
  'You answer briefly.',
  'You are a friendly teacher.',
  'You are a storyteller.',
  'Answer the question.',
];

// name -> pronoun
const NAMES: [string, 'He' | 'She'][] = [
  ['Mia', 'She'], ['Leo', 'He'], ['Anna', 'She'], ['Tom', 'He'], ['Lily', 'She'], ['Max', 'He'],
  ['Emma', 'She'], ['Ben', 'He'], ['Sara', 'She'], ['Sam', 'He'], ['Nora', 'She'], ['Jack', 'He'],
  ['Zoe', 'She'], ['Noah', 'He'], ['Ella', 'She'], ['Finn', 'He'], ['Ruby', 'She'], ['Oscar', 'He'],
  ['Ava', 'She'], ['Hugo', 'He'], ['Lucy', 'She'], ['Omar', 'He'], ['Ivy', 'She'], ['Paul', 'He'],
];
const COLORS = ['red', 'blue', 'green', 'yellow', 'white', 'black', 'purple', 'orange', 'pink', 'brown', 'silver', 'golden'];
const OBJECTS = [
  'key', 'ball', 'hat', 'box', 'book', 'cup', 'shoe', 'stone', 'kite', 'bell', 'coin', 'map', 'spoon', 'lamp',
  'ring', 'feather', 'shell', 'bottle', 'flower', 'clock', 'boat', 'drum', 'leaf', 'button',
];
const PLACES = ['garden', 'forest', 'park', 'kitchen', 'river', 'library', 'market', 'attic', 'beach', 'field', 'school', 'cave', 'barn', 'village'];

interface Animal {
  plural: string;
  singular: string;
  home: string;
  food: string;
  legs: string;
  sound: string;
}
const ANIMALS: Animal[] = [
  { plural: 'bees', singular: 'bee', home: 'a hive', food: 'nectar', legs: 'six', sound: 'buzz' },
  { plural: 'owls', singular: 'owl', home: 'a tree', food: 'mice', legs: 'two', sound: 'hoot' },
  { plural: 'cats', singular: 'cat', home: 'a house', food: 'fish', legs: 'four', sound: 'meow' },
  { plural: 'dogs', singular: 'dog', home: 'a kennel', food: 'meat', legs: 'four', sound: 'woof' },
  { plural: 'ducks', singular: 'duck', home: 'a pond', food: 'seeds', legs: 'two', sound: 'quack' },
  { plural: 'cows', singular: 'cow', home: 'a barn', food: 'grass', legs: 'four', sound: 'moo' },
  { plural: 'frogs', singular: 'frog', home: 'a pond', food: 'flies', legs: 'four', sound: 'ribbit' },
  { plural: 'spiders', singular: 'spider', home: 'a web', food: 'insects', legs: 'eight', sound: 'nothing' },
  { plural: 'horses', singular: 'horse', home: 'a stable', food: 'hay', legs: 'four', sound: 'neigh' },
  { plural: 'sheep', singular: 'sheep', home: 'a field', food: 'grass', legs: 'four', sound: 'baa' },
  { plural: 'wolves', singular: 'wolf', home: 'a den', food: 'meat', legs: 'four', sound: 'howl' },
  { plural: 'lions', singular: 'lion', home: 'the savanna', food: 'meat', legs: 'four', sound: 'roar' },
  { plural: 'snakes', singular: 'snake', home: 'a burrow', food: 'mice', legs: 'no', sound: 'hiss' },
  { plural: 'ants', singular: 'ant', home: 'a nest', food: 'sugar', legs: 'six', sound: 'nothing' },
  { plural: 'pigs', singular: 'pig', home: 'a sty', food: 'corn', legs: 'four', sound: 'oink' },
  { plural: 'crows', singular: 'crow', home: 'a nest', food: 'seeds', legs: 'two', sound: 'caw' },
  { plural: 'mice', singular: 'mouse', home: 'a hole', food: 'cheese', legs: 'four', sound: 'squeak' },
  { plural: 'goats', singular: 'goat', home: 'a hill', food: 'leaves', legs: 'four', sound: 'bleat' },
  { plural: 'bats', singular: 'bat', home: 'a cave', food: 'insects', legs: 'two', sound: 'squeak' },
  { plural: 'crabs', singular: 'crab', home: 'the beach', food: 'algae', legs: 'ten', sound: 'click' },
];
const NUMBER_WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten'];

/** Categories for lists; `cyclic` ones can start anywhere ("starting with ..."). */
const CATEGORIES: { name: string; items: string[]; cyclic: boolean }[] = [
  { name: 'days of the week', items: ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday'], cyclic: true },
  {
    name: 'months',
    items: ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'],
    cyclic: true,
  },
  { name: 'colors of the rainbow', items: ['red', 'orange', 'yellow', 'green', 'blue', 'indigo', 'violet'], cyclic: false },
  { name: 'fruits', items: ['apple', 'banana', 'cherry', 'grape', 'lemon', 'mango', 'orange', 'pear', 'plum'], cyclic: false },
  { name: 'planets', items: ['Mercury', 'Venus', 'Earth', 'Mars', 'Jupiter', 'Saturn', 'Uranus', 'Neptune'], cyclic: false },
  { name: 'vegetables', items: ['carrot', 'potato', 'onion', 'pepper', 'bean', 'pea', 'cabbage', 'tomato'], cyclic: false },
  { name: 'seasons', items: ['spring', 'summer', 'autumn', 'winter'], cyclic: true },
];

const WORDS = [
  'blue', 'stone', 'sings', 'softly', 'the', 'river', 'runs', 'fast', 'green', 'tree', 'grows', 'tall', 'little', 'bird',
  'flies', 'home', 'warm', 'bread', 'smells', 'good', 'cold', 'wind', 'blows', 'hard', 'happy', 'child', 'laughs', 'loud',
  'old', 'ship', 'sails', 'away', 'bright', 'star', 'shines', 'tonight', 'quiet', 'mouse', 'sleeps', 'here', 'red', 'apple',
  'falls', 'down', 'big', 'dog', 'runs', 'far',
];
const TIMES: [string, number][] = [['two', 2], ['three', 3], ['four', 4]];

const cap = (s: string): string => s.charAt(0).toUpperCase() + s.slice(1);
/** "a" or "an" before a word. */
const a = (word: string): string => (/^[aeiou]/i.test(word) ? `an ${word}` : `a ${word}`);

/** Integer in [lo, hi] (inclusive). */
function int(rng: Rng, lo: number, hi: number): number {
  return lo + Math.floor(rng.next() * (hi - lo + 1));
}
function pick<T>(rng: Rng, xs: readonly T[]): T {
  return xs[Math.floor(rng.next() * xs.length)];
}

function story(rng: Rng): Omit<StructuredSample, 'system'> {
  const [name, he] = pick(rng, NAMES);
  const color = pick(rng, COLORS);
  const obj = pick(rng, OBJECTS);
  const place = pick(rng, PLACES);
  const prompt = pick(rng, [
    `Tell me a story about ${name} and the ${color} ${obj} in the ${place}.`,
    `Write a short story: ${name} finds ${a(color)} ${obj} in the ${place}.`,
    `Can you tell a story where ${name} finds ${a(color)} ${obj} in the ${place}?`,
  ]);
  const his = he === 'He' ? 'his' : 'her';
  const answer =
    `Once upon a time, there was a child named ${name} who lived near the ${place}. ` +
    `One morning, ${name} walked to the ${place} and found ${a(color)} ${obj}. ` +
    `${he} picked up the ${color} ${obj} and looked at it closely. ` +
    `"What a beautiful ${obj}!" said ${name}. ` +
    `${he} took the ${color} ${obj} home and showed it to ${his} family. ` +
    `That night, ${name} dreamed about the ${place} and the ${color} ${obj}. ` +
    `From that day on, ${name} kept the ${color} ${obj} safe, and ${he.toLowerCase()} never forgot the ${place}. The end.`;
  return { task: 'story', prompt, answer };
}

function facts(rng: Rng): Omit<StructuredSample, 'system'> {
  const x = pick(rng, ANIMALS);
  const n = int(rng, 2, 5);
  const prompt = pick(rng, [
    `Give me ${n} facts about ${x.plural}.`,
    `Tell me ${n} facts about ${x.plural}.`,
    `What are ${n} facts about ${x.plural}?`,
  ]);
  const all = [
    `${cap(x.plural)} live in ${x.home}.`,
    `${cap(x.plural)} eat ${x.food}.`,
    `${cap(a(x.singular))} has ${x.legs} legs.`,
    `The sound ${a(x.singular)} makes is ${x.sound}.`,
    `You can find ${x.plural} in ${x.home}.`,
  ];
  const lines = all.slice(0, n).map((f, i) => `${i + 1}. ${f}`);
  const answer =
    `Here is a fact sheet about ${x.plural}.\n` +
    `Animal: ${x.singular}\nHome: ${x.home}\nFood: ${x.food}\nLegs: ${x.legs}\nSound: ${x.sound}\n\n` +
    `Here are ${NUMBER_WORDS[n]} facts about ${x.plural}:\n${lines.join('\n')}\n` +
    `That is ${NUMBER_WORDS[n]} facts about ${x.plural}.`;
  return { task: 'facts', prompt, answer };
}

function count(rng: Rng): Omit<StructuredSample, 'system'> {
  const kind = int(rng, 0, 2);
  if (kind === 0) {
    const a = int(rng, 1, 80);
    const b = a + int(rng, 4, 14);
    const xs = Array.from({ length: b - a + 1 }, (_, i) => a + i);
    return {
      task: 'count',
      prompt: pick(rng, [`Count from ${a} to ${b}.`, `Please count from ${a} to ${b}.`]),
      answer: `Sure. Counting from ${a} to ${b}:\n${xs.join(', ')}.\nDone counting from ${a} to ${b}.`,
    };
  }
  if (kind === 1) {
    const a = int(rng, 1, 80);
    const b = a + int(rng, 4, 14);
    const xs = Array.from({ length: b - a + 1 }, (_, i) => b - i);
    return {
      task: 'count',
      prompt: pick(rng, [`Count down from ${b} to ${a}.`, `Please count down from ${b} to ${a}.`]),
      answer: `Sure. Counting down from ${b} to ${a}:\n${xs.join(', ')}.\nDone counting down from ${b} to ${a}.`,
    };
  }
  const a = 2 * int(rng, 0, 40);
  const b = a + 2 * int(rng, 4, 10);
  const xs = Array.from({ length: (b - a) / 2 + 1 }, (_, i) => a + 2 * i);
  return {
    task: 'count',
    prompt: pick(rng, [`Count by twos from ${a} to ${b}.`, `Please count by twos from ${a} to ${b}.`]),
    answer: `Sure. Counting by twos from ${a} to ${b}:\n${xs.join(', ')}.\nDone counting by twos from ${a} to ${b}.`,
  };
}

function list(rng: Rng): Omit<StructuredSample, 'system'> {
  const c = pick(rng, CATEGORIES);
  const n = int(rng, 3, Math.min(7, c.items.length));
  let start = 0;
  let prompt: string;
  if (c.cyclic && rng.next() < 0.6) {
    start = int(rng, 0, c.items.length - 1);
    prompt = `Name ${n} ${c.name}, starting with ${c.items[start]}.`;
  } else {
    prompt = pick(rng, [`List ${n} ${c.name}.`, `Name ${n} ${c.name}.`]);
  }
  const items = Array.from({ length: n }, (_, i) => c.items[(start + i) % c.items.length]);
  const answer = `Here are ${NUMBER_WORDS[n]} ${c.name}:\n${items.map((x, i) => `${i + 1}. ${x}`).join('\n')}\nThat is a list of ${NUMBER_WORDS[n]} ${c.name}.`;
  return { task: 'list', prompt, answer };
}

function repeat(rng: Rng): Omit<StructuredSample, 'system'> {
  const len = int(rng, 3, 5);
  const phrase = Array.from({ length: len }, () => pick(rng, WORDS)).join(' ');
  const [word, times] = pick(rng, TIMES);
  const prompt = pick(rng, [`Repeat this ${word} times: ${phrase}`, `Say "${phrase}" ${word} times.`]);
  const lines = Array.from({ length: times }, (_, i) => `${i + 1}. ${phrase}`);
  const answer = `Here it is ${word} times:\n${lines.join('\n')}`;
  return { task: 'repeat', prompt, answer };
}

const MAKERS: Record<StructuredTask, (rng: Rng) => Omit<StructuredSample, 'system'>> = { story, facts, count, list, repeat };
/** Mixture weights of the tasks in the training corpus. */
const TASK_WEIGHTS: [StructuredTask, number][] = [['story', 0.36], ['facts', 0.2], ['count', 0.2], ['list', 0.12], ['repeat', 0.12]];

/** One conversation (the task drawn from the mixture, a system message half of the time). */
export function sampleConversation(rng: Rng): StructuredSample {
  let u = rng.next();
  let task: StructuredTask = TASK_WEIGHTS[TASK_WEIGHTS.length - 1][0];
  for (const [t, w] of TASK_WEIGHTS) {
    if (u < w) {
      task = t;
      break;
    }
    u -= w;
  }
  const withSystem = rng.next() < 0.5;
  const system = withSystem ? pick(rng, SYSTEMS) : undefined;
  const s = MAKERS[task](rng);
  return system === undefined ? s : { ...s, system };
}

/** Per-task counts of the held-out prompt set (64 in all). */
export const HELDOUT_COUNTS: Record<StructuredTask, number> = { story: 20, facts: 12, count: 14, list: 8, repeat: 10 };

/** The held-out prompts: distinct, from their own seed, in task order. */
export function heldOutSamples(seed = HELDOUT_SEED): StructuredSample[] {
  const rng = new Rng(seed);
  const out: StructuredSample[] = [];
  const seen = new Set<string>();
  for (const task of STRUCTURED_TASKS) {
    let k = 0;
    let tries = 0;
    while (k < HELDOUT_COUNTS[task]) {
      if (++tries > 10000) fail('E_INTERNAL', `cannot draw ${HELDOUT_COUNTS[task]} distinct held-out ${task} prompts`);
      const s = MAKERS[task](rng);
      if (seen.has(s.prompt)) continue;
      seen.add(s.prompt);
      out.push(s);
      k++;
    }
  }
  return out;
}

/** The training conversations: `n` samples from `seed`, without any whose prompt is held out. */
export function trainingSamples(n: number, seed = STRUCTURED_SEED, heldOut: StructuredSample[] = heldOutSamples()): StructuredSample[] {
  const banned = new Set(heldOut.map((s) => s.prompt));
  const rng = new Rng(seed);
  const out: StructuredSample[] = [];
  while (out.length < n) {
    const s = sampleConversation(rng);
    if (!banned.has(s.prompt)) out.push(s);
  }
  return out;
}

/** Chat messages of a sample (system first when present). */
export function sampleMessages(s: StructuredSample): { role: 'system' | 'user' | 'assistant'; content: string }[] {
  return [
    ...(s.system === undefined ? [] : [{ role: 'system' as const, content: s.system }]),
    { role: 'user' as const, content: s.prompt },
    { role: 'assistant' as const, content: s.answer },
  ];
}

/**
 * The structured model's tokenizer: `buildTinyTokenizer`'s files (specials, ChatML template,
 * generation config) with the BPE vocabulary and merges retrained on `samples`' text (message
 * contents and role names) to STRUCTURED_VOCAB_SIZE tokens.
 */
export function buildStructuredTokenizer(samples: StructuredSample[]): TinyTokenizer {
  const text = samples
    .map((s) => sampleMessages(s).map((m) => `${m.role}\n${m.content}\n`).join(''))
    .join('');
  const trained = trainByteLevelBpe(text, STRUCTURED_VOCAB_SIZE, TINY_SPECIAL_TOKENS.length);
  const base = buildTinyTokenizer();
  const vocab: Record<string, number> = {};
  TINY_SPECIAL_TOKENS.forEach((t, i) => {
    vocab[t] = i;
  });
  for (const [t, id] of trained.vocab) vocab[t] = id;
  const model = { ...(base.tokenizerJson['model'] as Record<string, unknown>), vocab, merges: trained.merges.map(([a, b]) => `${a} ${b}`) };
  return { ...base, tokenizerJson: { ...base.tokenizerJson, model }, vocabSize: Object.keys(vocab).length };
}
