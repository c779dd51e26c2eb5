/** Real-world config.json shapes: parsing, parameter counts against published figures, backend fit. */
import { parseDecoderConfig, parameterCount } from '../src/model/config.js';
import { checkFitsBackend, estimateMemory } from '../src/model/memory.js';
import { expectedTensors } from '../src/model/weights.js';
import { WASM_HEAP_BYTES } from '../src/backend.js';

const LLAMA31_8B = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', vocab_size: 128256, hidden_size: 4096, intermediate_size: 14336,
  num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5, rope_theta: 500000.0,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  max_position_embeddings: 131072, tie_word_embeddings: false, bos_token_id: 128000, eos_token_id: [128001, 128008, 128009], torch_dtype: 'bfloat16',
  hidden_act: 'silu', attention_bias: false, mlp_bias: false,
};
const QWEN25_05B = {
  architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', vocab_size: 151936, hidden_size: 896, intermediate_size: 4864,
  num_hidden_layers: 24, num_attention_heads: 14, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_theta: 1000000.0,
  max_position_embeddings: 32768, tie_word_embeddings: true, use_sliding_window: false, sliding_window: 32768, max_window_layers: 21,
  bos_token_id: 151643, eos_token_id: 151643, torch_dtype: 'bfloat16', hidden_act: 'silu',
};
const MISTRAL_7B = {
  architectures: ['MistralForCausalLM'], model_type: 'mistral', vocab_size: 32000, hidden_size: 4096, intermediate_size: 14336,
  num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5, rope_theta: 10000.0,
  max_position_embeddings: 32768, sliding_window: 4096, tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2, torch_dtype: 'bfloat16', hidden_act: 'silu',
};

describe('real-world configs', () => {
  test('published parameter counts', () => {
    expect(parameterCount(parseDecoderConfig(LLAMA31_8B, 'llama/config.json'))).toBe(8_030_261_248);
    expect(parameterCount(parseDecoderConfig(QWEN25_05B, 'qwen/config.json'))).toBe(494_032_768);
    expect(parameterCount(parseDecoderConfig(MISTRAL_7B, 'mistral/config.json'))).toBe(7_241_732_096);
  });

  test('the tensor table agrees with the parameter count', () => {
    for (const cfg of [LLAMA31_8B, QWEN25_05B, MISTRAL_7B]) {
      const c = parseDecoderConfig(cfg, 'config.json');
      const total = expectedTensors(c).reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
      expect(total).toBe(parameterCount(c));
    }
    expect(expectedTensors(parseDecoderConfig(QWEN25_05B, 'c')).length).toBe(2 + 24 * 12);
    expect(expectedTensors(parseDecoderConfig(LLAMA31_8B, 'c')).length).toBe(3 + 32 * 9);
  });

  test('generation_config eos ids are merged with config.json, as transformers does', () => {
    const c = parseDecoderConfig(QWEN25_05B, 'c', { eos_token_id: [151645, 151643] });
    expect(c.eosTokenIds).toEqual([151645, 151643]);
    expect(parseDecoderConfig(LLAMA31_8B, 'c').eosTokenIds).toEqual([128001, 128008, 128009]);
  });

  test('an 8B model does not fit the wasm heap and the error says what to do; 0.5B does', () => {
    const big = parseDecoderConfig(LLAMA31_8B, 'llama/config.json');
    expect(() => checkFitsBackend(big, 'wasm', WASM_HEAP_BYTES, '/models/llama')).toThrow(
      expect.objectContaining({ code: 'E_BACKEND', message: expect.stringContaining('--backend native') }),
    );
    expect(() => checkFitsBackend(big, 'tensorflow', Number.MAX_SAFE_INTEGER, '/models/llama')).not.toThrow();
    const small = parseDecoderConfig(QWEN25_05B, 'qwen/config.json');
    expect(() => checkFitsBackend(small, 'wasm', WASM_HEAP_BYTES, '/models/qwen')).not.toThrow();
    // weights (with the transposed tied lm_head copy) dominate
    expect(estimateMemory(small, 512).weightsBytes).toBe(4 * (494_032_768 + 151936 * 896));
  });

  test('Qwen2 with per-layer sliding windows and Llama with mlp_bias are refused by key', () => {
    expect(() => parseDecoderConfig({ ...QWEN25_05B, use_sliding_window: true }, 'q/config.json')).toThrow(/use_sliding_window/);
    expect(() => parseDecoderConfig({ ...LLAMA31_8B, mlp_bias: true }, 'l/config.json')).toThrow(/mlp_bias/);
    expect(() => parseDecoderConfig({ ...LLAMA31_8B, hidden_act: 'gelu' }, 'l/config.json')).toThrow(/hidden_act/);
  });
});
