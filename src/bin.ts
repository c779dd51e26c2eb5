#!/usr/bin/env node
/**
 * The `medusa-train` executable. It re-executes itself once with the allocator settings (src/process.ts)
 * before loading anything heavy, so the parent costs little; the CLI itself is src/cli.ts.
 */
import { reexecWithAllocatorSettings, watchParent } from './process.js';

if (!reexecWithAllocatorSettings()) {
  if (process.env['MEDUSA_TRAIN_REEXEC'] === '1') watchParent();
  const { main } = await import('./cli.js');
  process.exit(await main(process.argv.slice(2)));
}
